"""Bring your own checkpoint: a registered architecture with a head of any width, and its labels.

A fine-tuned network is one of the zoo's architectures whose last linear layer has as many
rows as the user's classes. This module finds that width in the checkpoint, reads the class
names (a labels file, or an ``ImageFolder`` tree's class folders in sorted order, as
torchvision's ``ImageFolder`` numbers them), and derives the :class:`~export.spec.ModelSpec`
the export writes: the user's name, labels and input convention over the architecture's
builder. The checkpoint itself is read by ``weights.load_state_dict`` (``weights_only``),
which also takes the common wrappers (:func:`unwrap`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .registry import list_models
from .spec import InputSpec, ModelSpec

# Where training scripts put the weights inside a checkpoint dict, most common first: Lightning
# and timm write "state_dict", many tutorials "model_state_dict", torchvision's references "model".
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")
# Prefixes that wrappers add to every name: DataParallel/DistributedDataParallel, torch.compile.
PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(ValueError):
    """A checkpoint or labels file that cannot make the model asked for; the message says why and what would."""


def unwrap(loaded: Any, where: str) -> tuple[dict[str, Tensor], str]:
    """The state dict inside what ``torch.load`` returned, and a sentence on what was found."""
    found = "a plain state dict"
    if isinstance(loaded, Mapping) and not _all_tensors(loaded):
        key = next((k for k in WRAPPER_KEYS if isinstance(loaded.get(k), Mapping)), None)
        if key is None:
            keys = ", ".join(sorted(str(k) for k in loaded)[:10])
            raise CheckpointError(
                f"{where} holds a dict without tensors at its top level nor under any of {', '.join(WRAPPER_KEYS)} "
                f"(its keys: {keys}): save model.state_dict(), or a dict with it under 'state_dict'"
            )
        found, loaded = f"the {key!r} entry of a checkpoint dict", loaded[key]
    if not isinstance(loaded, Mapping) or not loaded or not _all_tensors(loaded):
        raise CheckpointError(f"{where} is not a state dict (a mapping of parameter names to tensors)")
    state = {str(k): v for k, v in loaded.items()}
    for prefix in PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k.removeprefix(prefix): v for k, v in state.items()}
            found += f", its {prefix!r} prefix removed"
    return state, found


def _all_tensors(mapping: Mapping[Any, Any]) -> bool:
    return all(isinstance(v, Tensor) for v in mapping.values())


def read_labels(path: Path) -> list[str]:
    """One class name a line (blank lines at the end ignored); names must be unique."""
    if path.is_dir():
        raise CheckpointError(f"--labels {path} is a folder: give a file of class names, or --labels-from DIR")
    if not path.is_file():
        raise CheckpointError(f"--labels {path} does not exist")
    try:  # utf-8-sig: a byte order mark (Notepad's) is no part of the first class's name
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise CheckpointError(f"--labels {path} is not UTF-8 text: save it as UTF-8, one class a line") from None
    labels = [line.strip() for line in text.rstrip("\n").splitlines()]
    return _checked(labels, str(path))


def labels_from_folder(directory: Path) -> list[str]:
    """The class folders of an ``ImageFolder`` tree, sorted: torchvision's class indices."""
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a folder (expected DIR/<class>/<image files>)")
    return _checked(sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith(".")),
                    str(directory))  # fmt: skip


def _checked(labels: list[str], where: str) -> list[str]:
    if len(labels) < 2:
        raise CheckpointError(f"{where} names {len(labels)} class(es): a classifier needs at least two")
    blank = [i for i, label in enumerate(labels) if not label]
    if blank:
        raise CheckpointError(f"{where}: line {blank[0] + 1} is empty: every class needs a name")
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise CheckpointError(f"{where} names {', '.join(repeated)} more than once: class names must be unique")
    return labels


def head_name(spec: ModelSpec) -> str:
    """The classifier's output layer (the architecture's last linear layer), built on the meta device."""
    with torch.device("meta"):
        model = spec.build()
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)][-1]


def head_width(spec: ModelSpec, state: Mapping[str, Tensor], where: str) -> int:
    """How many classes the checkpoint's head has."""
    key = f"{head_name(spec)}.weight"
    if key not in state:
        raise CheckpointError(
            f"{where} has no {key!r}, the output layer of {spec.name}: is it a checkpoint of another architecture?"
        )
    return int(state[key].shape[0])


@dataclass(frozen=True)
class InputOverrides:
    """What a checkpoint trained with another input convention needs (None: the architecture's)."""

    size: int | None = None
    resize: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def apply(self, base: InputSpec) -> InputSpec:
        size = self.size or base.size
        # the architecture's resize-to-crop ratio (256/224) unless a resize is given
        resize = self.resize or (base.resize if self.size is None else round(size * base.resize / base.size))
        for name, values in (("mean", self.mean), ("std", self.std)):
            if values is not None and len(values) != base.channels:
                raise CheckpointError(f"--{name} takes {base.channels} value(s) for this network, not {len(values)}")
        if resize < size:
            raise CheckpointError(f"--resize {resize} is smaller than the input size {size}: the crop must fit")
        return dataclasses.replace(base, size=size, resize=resize, mean=self.mean or base.mean,
                                   std=self.std or base.std)  # fmt: skip


def check_name(base: ModelSpec, name: str | None) -> None:
    """A user's model may be named anything but another registered network."""
    if name not in (None, base.name) and name in list_models():
        raise CheckpointError(f"--as {name}: that is a registered network's name; choose a name of your own")


def adapt(base: ModelSpec, labels: list[str], name: str | None, inputs: InputOverrides) -> ModelSpec:
    """``base`` with ``labels`` as its classes (a head of that width), named ``name`` (else the base's)."""
    spec = dataclasses.replace(
        base,
        name=name or base.name,
        categories=tuple(labels),
        extra={**base.extra, "num_classes": len(labels)},
        input=inputs.apply(base.input),
        released=None,
        typicality_layer=None,  # fitted only where the export has the training images
        built_on=base.name,
    )
    with torch.device("meta"):
        model = spec.build()
        try:
            model.eval()(torch.empty(1, spec.input.channels, spec.input.size, spec.input.size))
        except RuntimeError as exc:
            detail = " ".join(str(exc).split())[:300]
            raise CheckpointError(
                f"{base.name} cannot take {spec.input.size}x{spec.input.size} images: {detail}"
            ) from None
    return dataclasses.replace(spec, num_params=sum(p.numel() for p in model.parameters()))


def fit_labels(spec: ModelSpec, state: Mapping[str, Tensor], labels: list[str] | None, where: str) -> list[str]:
    """The labels for ``state``'s head: the given ones if their count is its width, the architecture's if none
    were given and the width is the architecture's; else a clear error."""
    width = head_width(spec, state, where)
    if labels is None:
        if width == spec.num_classes:
            return list(spec.categories)
        raise CheckpointError(
            f"{where}'s head has {width} classes, {spec.name}'s {spec.num_classes}: give their names with "
            "--labels FILE (one a line, in the head's order) or --labels-from DIR (the training folder's classes)"
        )
    if len(labels) != width:
        raise CheckpointError(f"{where}'s head has {width} classes, and the labels name {len(labels)}: they must match")
    return labels
