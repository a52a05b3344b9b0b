"""What the service reads from a version's ``metadata.json`` (written by the export stage)."""

from __future__ import annotations

import math
from functools import cached_property
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class InputMeta(BaseModel):
    """The geometric preprocessing; the arithmetic part (mean, std) lives inside the graph."""

    model_config = ConfigDict(extra="allow", frozen=True)

    size: int = Field(gt=0)
    channels: Literal[1, 3]
    resize: int = Field(gt=0)
    crop: int = Field(gt=0)
    interpolation: Literal["bilinear"] = "bilinear"
    polarity: Literal["any", "light-on-dark"] = "any"
    mean: list[float]
    std: list[float]

    @model_validator(mode="after")
    def _crop_fits(self) -> InputMeta:
        if self.crop > self.resize or self.crop != self.size:
            raise ValueError(f"crop {self.crop} must equal size {self.size} and not exceed resize {self.resize}")
        return self


class ModelMetadata(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    name: str
    version: int
    num_params: int
    flops_per_image: int
    num_classes: int = Field(gt=0)
    input: InputMeta
    weights: dict[str, Any]
    architecture: dict[str, Any]
    onnx: dict[str, Any]
    verification: dict[str, Any] = Field(default_factory=dict)
    # Lower-precision variants (``python -m export NAME --precision int8``) say what they came from
    # and what they cost against it; an FP32 export has neither.
    precision: Literal["fp32", "int8", "fp16"] = "fp32"
    derived_from: dict[str, Any] | None = None
    accuracy: dict[str, Any] | None = None
    forced: bool = False
    # The top-1 probability below which an answer is not to be trusted, derived by the export
    # from labelled held-out images (``export/abstain.py``); absent where it had none.
    abstain: dict[str, Any] | None = None
    # The answers' distributions on the images the export measured them on (``export/baseline.py``)
    baseline: dict[str, Any] | None = None
    # The feature distance above which an image is unlike the training images, where the export
    # fitted the check into the graph's ``distance`` output (``export/typicality.py``)
    typicality: dict[str, Any] | None = None
    # The Grad-CAM graph beside the classifier (``export/explanation.py``): file, layer, map size,
    # its verification; for a variant, ``from`` names the FP32 parent whose graph explains it
    explanation: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _thresholds_are_numbers(self) -> ModelMetadata:
        """Read on every answer: a version whose thresholds are not numbers fails its load with why, rather than
        load and fail each request."""
        for section, high in (("abstain", 1.0), ("typicality", math.inf)):
            found = getattr(self, section)
            value = None if found is None else found.get("threshold")
            if found is None or (isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= high):
                continue
            raise ValueError(f"{section}.threshold must be a number from 0 to {high:g}, got {value!r}")
        return self

    @cached_property  # read on every request: computed once per loaded version
    def abstain_threshold(self) -> float | None:
        return None if self.abstain is None else float(self.abstain["threshold"])

    @cached_property
    def typicality_threshold(self) -> float | None:
        return None if self.typicality is None else float(self.typicality["threshold"])
