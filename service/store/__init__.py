"""The model store, and the contract between the export stage that writes it and the service that serves it.

What a model in the store is (``layout``, ``metadata``, ``integrity``, ``policy``), the names of its graphs'
tensors (``tensors``), how its inputs are made from images (``preprocess``), what its answers' quality is
measured by (``quality``), and how ONNX Runtime runs it on this host (``sessions``, ``host``). ``export``
imports nothing else from ``service``, and nothing here imports the runtime, the front ends or torch.
"""
