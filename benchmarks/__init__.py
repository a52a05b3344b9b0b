"""Benchmarks: the service against raw ONNX Runtime, its own transport and a PyTorch-eager baseline."""
