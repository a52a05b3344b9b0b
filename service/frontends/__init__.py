"""The ways in: ``/classify`` and ``/models`` over HTTP, the Open Inference Protocol (``v2``), the page."""
