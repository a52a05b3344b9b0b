"""Serving side: ONNX Runtime sessions behind BentoML, fed from the model store.

Importing this package is cheap; nothing here loads a model or imports torch.
"""
