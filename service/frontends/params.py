"""What a request's query brings: its parameters, and the service it reaches.

Shared by the HTTP front ends (``/classify``, ``/explain``): the same limits and 400s for
all of them (their bodies are read by :mod:`.body`). Each query parameter is declared once, as a :class:`Param`: the
OpenAPI document (the routes' ``openapi_extra``) and the checks of a request both read it,
so the reference cannot promise a bound the service does not hold (``/classify`` is answered
by the fast path, past FastAPI's own validation).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import Request
from starlette.datastructures import QueryParams

from ..errors import InvalidInput, ServiceError
from ..metrics import EXPLANATION_METHODS as METHODS
from ..runtime.classifier import Classifier


def classifier(request: Request) -> Classifier:
    found: Classifier | None = getattr(request.app.state, "classifier", None)
    if found is None:
        raise ServiceError("The service is starting: no model repository yet")
    return found


@dataclass(frozen=True)
class Param:
    """One query parameter, declared once: the API reference documents it (:meth:`openapi`) and a request is
    held to it (:meth:`parse`), with the same type, bounds and default."""

    name: str
    kind: Literal["integer", "number", "boolean", "string"]  # its OpenAPI type
    description: str
    default: Any = None
    minimum: float | None = None
    maximum: float | None = None
    limit: str | None = None  # the setting the maximum comes from, named in the error over it
    choices: tuple[str, ...] = ()  # a string's allowed values (compared in lower case)

    def parse(self, query: QueryParams) -> Any:
        """Its value in ``query``, checked; the default where absent. Given twice, it is refused: which one a
        client meant cannot be told (``?model=a&model=b`` answered with ``b`` was a silent guess)."""
        given = query.getlist(self.name)
        if len(given) > 1:
            shown = ", ".join(repr(value[:40]) for value in given[:4])
            raise InvalidInput(f"Parameter {self.name} is given {len(given)} times ({shown}): give it once")
        text = given[0] if given else None
        return self.default if text is None else PARSERS[self.kind](self, text)

    def openapi(self) -> dict[str, Any]:
        """Its OpenAPI parameter object."""
        schema: dict[str, Any] = {"type": self.kind}
        if self.choices:
            schema["enum"] = list(self.choices)
        for key in ("minimum", "maximum", "default"):
            if getattr(self, key) is not None:
                schema[key] = getattr(self, key)
        return {"name": self.name, "in": "query", "required": False, "description": self.description,
                "schema": schema}  # fmt: skip


def whole_number(text: str) -> int | None:
    """``text`` as a whole number where it is one in ASCII digits, at most 18 (``"²".isdigit()`` holds but ``int``
    refuses it, and ``int`` refuses a number of thousands of digits); else None."""
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 18 else None


def _integer(param: Param, text: str) -> int:
    """An integer from ``param.minimum`` (1 for every one of this API) to its maximum, if any."""
    most = param.maximum
    bounds = f"1 to {most}" if most is not None else "a positive integer"
    digits = text.strip().removeprefix("+")
    if digits.startswith("-") and digits[1:].isascii() and digits[1:].isdecimal():  # an integer, below the range
        raise InvalidInput(f"Invalid parameter: {param.name}={text.strip()} is out of range; use {bounds}")
    if not (digits.isascii() and digits.isdecimal()):  # ASCII: "５" and "٣" are decimal to Python, not to a client
        raise InvalidInput(f"Invalid parameter: {param.name}={text!r} is not an integer; use {bounds}")
    value = int(digits) if len(digits) <= 18 else None
    if value is not None and most is not None and value > most and param.limit:
        raise InvalidInput(f"{param.name}={value} is over the limit: use {bounds} ({param.limit})")
    if value is None or value < (param.minimum or 0) or (most is not None and value > most):
        raise InvalidInput(f"Invalid parameter: {param.name}={text.strip()} is out of range; use {bounds}")
    return value


def _number(param: Param, text: str) -> float:
    """A number within the bounds; the API's one number is a probability, and the error says so."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    low, high = param.minimum or 0.0, param.maximum if param.maximum is not None else float("inf")
    if not low <= value <= high:  # NaN fails too
        raise InvalidInput(
            f"Invalid parameter: {param.name}={text.strip()!r} is not a probability; use a number from {low:g} to "
            f"{high:g}"
        )
    return value


TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")  # what FastAPI's bool query parameters take


def _boolean(param: Param, text: str) -> bool:
    value = text.strip().lower()
    if value not in TRUE + FALSE:
        raise InvalidInput(f"Invalid parameter: {param.name}={value!r}; use true or false")
    return value in TRUE


def _string(param: Param, text: str) -> str:
    if not param.choices:
        return text
    value = text.strip().lower()
    if value not in param.choices:
        raise InvalidInput(f"Unknown {param.name} {value!r}: use {' or '.join(param.choices)}")
    return value


PARSERS: dict[str, Callable[[Param, str], Any]] = {
    "integer": _integer, "number": _number, "boolean": _boolean, "string": _string
}  # fmt: skip


class Params(tuple[Param, ...]):
    """A route's query parameters, in the order the API reference lists them."""

    def parse(self, query: QueryParams) -> dict[str, Any]:
        """Every parameter's value (its default where absent), by name; the first bad one, or one this route does
        not take (a misspelt ``?modle=`` would otherwise answer with the default model), raises InvalidInput."""
        names = [param.name for param in self]
        unknown = [name for name in dict.fromkeys(query.keys()) if name not in names]
        if unknown:
            raise InvalidInput(f"Unknown parameter {unknown[0][:80]!r}: this route takes {', '.join(names)}")
        return {param.name: param.parse(query) for param in self}

    def openapi(self) -> dict[str, Any]:
        """The route's ``openapi_extra``: these parameters, documented."""
        return {"parameters": [param.openapi() for param in self]}


# the parameters of /classify and /explain (and /models' one), each declared once
MODEL = Param("model", "string", "Network to use, e.g. resnet50; see GET /models")
VERSION = Param("version", "integer", "Model version; default the highest one served", minimum=1)
MIN_CONFIDENCE = Param(
    "min_confidence", "number", "Each result says whether its top-1 probability reaches this (`confident`); default "
    "the model's abstain threshold, where its export derived one", minimum=0, maximum=1,
)  # fmt: skip
EXPLAINED = (
    Param("class", "string", "Class to explain: a label or an index; default the top-1"),
    Param("method", "string", "gradcam (default where the version has an explanation graph) or occlusion (any model)",
          choices=METHODS),
    Param("patch", "integer", "Occluding square's side in input pixels; default a seventh of it", minimum=1),
    Param("stride", "integer", "Its step; default half the patch", minimum=1),
    Param("overlay", "boolean", "Add the map drawn over the crop, a base64 PNG", default=False),
    Param("layers", "boolean", "Add what each layer sees (LeNet-5's C1, S2, C3 and S4 activations)", default=False),
)  # fmt: skip
MODELS = Params((Param("per_class", "boolean", "Add each fine-tuned model's held-out accuracy per class and confusion "
                       "matrix", default=False),))  # fmt: skip


def top_k(max_top_k: int) -> Param:
    """``top_k``, bounded by the setting ``MAX_TOP_K``."""
    return Param("top_k", "integer", "Predictions per image (clamped to the class count)", default=5, minimum=1,
                 maximum=max_top_k, limit="MAX_TOP_K")  # fmt: skip


@functools.cache
def classify_params(max_top_k: int) -> Params:
    """``POST /classify``'s query parameters."""
    return Params((MODEL, top_k(max_top_k), VERSION, MIN_CONFIDENCE))


@functools.cache
def explain_params(max_top_k: int) -> Params:
    """``POST /explain``'s query parameters."""
    return Params((MODEL, VERSION, *EXPLAINED, top_k(max_top_k)))
