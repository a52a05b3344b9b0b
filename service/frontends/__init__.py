"""The ways in: ``/classify`` and ``/models`` over HTTP, and the Open Inference Protocol (``v2``)."""
