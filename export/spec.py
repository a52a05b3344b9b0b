"""What a registered network is: its builder, its input convention and where its weights come from.

These frozen dataclasses are the single source of truth for preprocessing and labels
(as torchvision's ``Weights.meta`` and timm's ``PretrainedCfg`` are): the export stage
writes them into ``metadata.json`` next to the graph and the service reads them from
there. Nothing downstream hard-codes a mean, a crop size or a class name.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from torch import Tensor, nn

_DATA = Path(__file__).parent / "data"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Polarity = Literal["any", "light-on-dark"]
WeightsKind = Literal["imagenet", "trained", "random", "file"]


@cache
def imagenet_categories() -> tuple[str, ...]:
    """The 1,000 ImageNet-1K class names in torchvision's order (index = class id)."""
    names = (_DATA / "imagenet_classes.txt").read_text(encoding="utf-8").splitlines()
    return tuple(names)


DIGIT_CATEGORIES = tuple(str(d) for d in range(10))


@dataclass(frozen=True)
class InputSpec:
    """How an image becomes the tensor the network was trained on.

    The geometric part (resize, crop, channels, polarity) runs in the service before the
    graph; the arithmetic part (scale to [0, 1], ``(x - mean) / std``) runs inside the graph.
    """

    size: int  # square side the network sees, after the crop
    channels: int  # 3 = RGB, 1 = grayscale
    resize: int  # the shorter side is resized to this before the centre crop
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"
    polarity: Polarity = "any"  # "light-on-dark": dark-on-light drawings are inverted

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "crop": self.size, "layout": "NHWC", "dtype": "uint8"}


@dataclass(frozen=True)
class ReleasedWeights:
    """A weight file published by torchvision, named ``<stem>-<sha256 prefix>.pth``."""

    url: str
    top1: float  # ImageNet-1K validation accuracy the release reports, in percent
    file_mib: float = 0.0  # the file's size as torchvision publishes it (its ``_file_size``), for `export list`

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def hash_prefix(self) -> str:
        match = re.search(r"-([a-f0-9]{6,})\.", self.filename)
        if match is None:
            raise ValueError(f"{self.filename!r} carries no hash prefix")
        return match.group(1)


# torchvision's evaluation transform for its V1 ImageNet releases: shorter side to 256
# (bilinear), centre crop 224, ImageNet mean and std.
IMAGENET_INPUT = InputSpec(size=224, channels=3, resize=256, mean=IMAGENET_MEAN, std=IMAGENET_STD)


Builder = Callable[..., "nn.Module"]


@dataclass(frozen=True)
class ModelSpec:
    """One registered network: ``build(state_dict=...)`` returns it ready for ``eval()``."""

    name: str
    family: str
    paper: str
    builder: Builder
    num_params: int
    input: InputSpec
    categories: tuple[str, ...]
    default_weights: WeightsKind
    released: ReleasedWeights | None = None
    notes: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)
    # the module whose output the typicality check is fitted on, where the export has the
    # training images (``export/typicality.py``), and how many features it gives per image
    typicality_layer: str | None = None
    typicality_features: int = 0
    # a user's model (``export/checkpoint.py``): the registered architecture it is built on
    built_on: str | None = None

    def build(self, state_dict: Mapping[str, Tensor] | None = None) -> nn.Module:
        return self.builder(state_dict=state_dict, **self.extra)

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    @property
    def onnx_mib(self) -> float:
        """The exported graph's size: float32 initialisers, 4 bytes a parameter (batch norm folds into convolutions),
        and the typicality check's whitening, centres and their norms where the default weights get one."""
        d, c = self.typicality_features, self.num_classes
        return 4 * (self.num_params + (d * d + c * d + c if d else 0)) / 2**20

    @property
    def weight_choices(self) -> tuple[WeightsKind, ...]:
        return (self.default_weights, "random") if self.default_weights != "random" else ("random",)
