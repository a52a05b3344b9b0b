"""Typed errors that carry their HTTP status; mapped to ``{"error": ...}`` once, at the edge."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def validation_problems(errors: Iterable[Mapping[str, Any]], skip: int = 0, whole: str = "") -> str:
    """pydantic's errors as a person reads them, ``where: what; ...``: each location less its first ``skip``
    parts (FastAPI's ``query``, say), ``whole`` where nothing is left (the object itself)."""
    return "; ".join(f"{'.'.join(map(str, e['loc'][skip:])) or whole}: {e['msg']}" for e in errors)


class ServiceError(Exception):
    status_code = 500
    retry_after: int | None = None  # seconds, sent as Retry-After where set

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ClientGone(ServiceError):
    """The request's body ended early: the client went away (499, as nginx says), or the connection refused the
    rest of it (``status_code``: what the client was answered, 408 or 413). No answer is sent (there is no one to
    send it to, or it was sent); counted as no outcome where the client went away, else as the 4xx it got."""

    def __init__(self, status_code: int = 499) -> None:
        super().__init__("the request's body ended before it was whole")
        self.status_code = status_code


class InvalidInput(ServiceError):
    """The client sent something we cannot use: an undecodable image, a bad parameter."""

    status_code = 400


class ModelNotFound(ServiceError):
    status_code = 404

    def __init__(self, name: str, available: list[str], version: int | None = None) -> None:
        what = f"model {name!r}" if version is None else f"version {version} of model {name!r}"
        super().__init__(f"Unknown {what}; available: {', '.join(available) or 'none'}")


class ModelUnloaded(ServiceError):
    """A model in the store that the repository API unloaded (MODEL_CONTROL=explicit)."""

    status_code = 404


class CanaryNotFound(ServiceError):
    """The repository API named a primary that has no ``CANARY``."""

    status_code = 404


class RepositoryError(ServiceError):
    """A repository call the service's model control refuses (not explicit mode): 409 Conflict."""

    status_code = 409


class ModelLoadFailed(ServiceError):
    """A repository load whose model cannot be served; the message carries the reason (400, as Triton)."""

    status_code = 400


class PayloadTooLarge(ServiceError):
    status_code = 413


class UnsupportedMediaType(ServiceError):
    status_code = 415


class ModelNotReady(ServiceError):
    status_code = 503


class Overloaded(ServiceError):
    """Load shedding: the model's queue is full; the client should retry later."""

    status_code = 503


class Stranded(ModelNotReady):
    """A request that was waiting for a batch when its model version was unloaded: safe to send again."""

    retry_after = 1


class DeviceOutOfMemory(ServiceError):
    """A batch the device had no memory for: its requests are safe to send again (the batches shrink)."""

    status_code = 503
    retry_after = 1
