"""The Open Inference Protocol's gRPC messages and service, generated from grpc_predict_v2.proto."""
