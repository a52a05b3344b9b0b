"""The Open Inference Protocol (KServe v2): one handler, served over ``/v2`` HTTP and gRPC."""
