"""From encoded images to ranked classes: ONNX Runtime sessions, batching, the models served."""
