"""A small client for the CNN serving service: ``python -m client`` and ``Client(url).classify(...)``.

It needs httpx and tqdm only, and installs on its own: ``pip install ./client``.
"""

from .api import Client, Prediction, Result, ServiceUnavailableError

__all__ = ["Client", "Prediction", "Result", "ServiceUnavailableError"]
