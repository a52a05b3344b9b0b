"""Export stage: the classic CNN zoo in PyTorch -> verified ONNX graphs in a versioned model store.

Needs torch (the ``export`` extra); the service never imports this package.
"""
