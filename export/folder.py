"""A folder of labelled images in torchvision's ``ImageFolder`` layout (``DIR/<class>/<image>``): read through
the service's own decoder, checked, and split three ways, stratified by class.

- **train**: what the weights are fitted on (with augmentation);
- **select**: a tenth of the rest, which picks the epoch kept (early stopping), so that
- **held_out** (``--val-split``, a fifth by default) is never seen by training nor by the choice of the
  epoch: the accuracy it gives is the one a user can expect, and the one recorded in the metadata.

Every image is decoded once, as the service decodes it (``service/store/preprocess.py``): the served
crop for the select and held-out parts, the whole ``resize`` square for the training part, where the
random crops are taken. A file that does not decode is reported by path and skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.store.metadata import InputMeta
from service.store.preprocess import open_image, pixels_of

from .calibration import IMAGE_SUFFIXES, MAX_PIXELS, ImageSet
from .checkpoint import CheckpointError, labels_from_folder

logger = logging.getLogger(__name__)

SPLIT_FILE = "split.json"  # beside a fine-tuned version's graph: which file went into which part
SELECT_FRACTION = 0.1  # of what is left after the held-out part: picks the epoch
MIN_PER_CLASS = 3  # one image for each part


class FolderError(CheckpointError):
    """A folder that cannot be trained on; the message says why and what would do."""


@dataclass(frozen=True)
class Part:
    """One part of the split: its images (uint8 NHWC), labels and file names relative to the folder."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    files: list[str]
    sha256: str

    def as_image_set(self, folder: Path) -> ImageSet:
        return ImageSet(f"the {self.name} split of {folder} ({len(self.files)} images)", self.images, self.labels)

    def describe(self) -> dict[str, Any]:
        return {"images": len(self.files), "sha256": self.sha256}


@dataclass(frozen=True)
class LabelledFolder:
    directory: Path
    classes: list[str]
    train: Part  # at the resize square, for random crops
    select: Part  # as served
    held_out: Part  # as served
    skipped: list[str]

    def describe(self, held_out_fraction: float, seed: int) -> dict[str, Any]:
        return {
            "folder": str(self.directory),
            "classes": len(self.classes),
            "split": f"stratified by class, seed {seed}: {held_out_fraction:.0%} held out, {SELECT_FRACTION:.0%} of "
            "the rest to pick the epoch, the rest to train",
            **{part.name: part.describe() for part in (self.train, self.select, self.held_out)},
            "unreadable_files": len(self.skipped),
            "files": SPLIT_FILE,
        }

    def write_split(self, path: Path) -> None:
        """Each part's files, relative to the folder, so that anyone can measure the model again on them."""
        parts = {part.name: part.files for part in (self.train, self.select, self.held_out)}
        path.write_text(json.dumps({"folder": str(self.directory), "classes": self.classes, **parts}, indent=1) + "\n")


def _files(directory: Path, classes: list[str]) -> list[tuple[Path, int]]:
    found = []
    for index, name in enumerate(classes):
        paths = sorted(p for p in (directory / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        found += [(path, index) for path in paths]
    return found


def _split(labels: np.ndarray, classes: list[str], held_out: float, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    parts: dict[str, list[int]] = {"train": [], "select": [], "held_out": []}
    for index, name in enumerate(classes):
        members = rng.permutation(np.flatnonzero(labels == index))
        if len(members) < MIN_PER_CLASS:
            raise FolderError(
                f"class {name!r} has {len(members)} readable image(s): the split needs at least {MIN_PER_CLASS} "
                "(to train on, to pick the epoch by, to measure on); add images or remove the class"
            )
        n_held = max(1, round(len(members) * held_out))
        n_select = max(1, round((len(members) - n_held) * SELECT_FRACTION))
        n_select = min(n_select, len(members) - n_held - 1)
        parts["held_out"] += members[:n_held].tolist()
        parts["select"] += members[n_held : n_held + n_select].tolist()
        parts["train"] += members[n_held + n_select :].tolist()
    return {name: np.sort(np.array(indices)) for name, indices in parts.items()}


def read(directory: Path, spec: InputMeta, held_out: float = 0.2, seed: int = 0) -> LabelledFolder:
    """The folder's images decoded as served, split; a :class:`FolderError` with nothing read where it cannot be."""
    if not 0 < held_out < 1:
        raise FolderError(f"--val-split {held_out} must be between 0 and 1")
    classes = labels_from_folder(directory)
    squares, served, names, digests, labels, skipped = [], [], [], [], [], []
    for path, label in _files(directory, classes):
        data = path.read_bytes()
        try:  # decoded once, as the service decodes it
            image = open_image(data, MAX_PIXELS, draft_to=spec.resize)
            squares.append(pixels_of(image, spec, spec.resize))
            served.append(pixels_of(image, spec, spec.crop))
        except Exception as exc:  # reported by path, skipped
            skipped.append(f"{path.relative_to(directory)} ({exc})")
            continue
        names.append(str(path.relative_to(directory)))
        digests.append(hashlib.sha256(data).hexdigest())
        labels.append(label)
    if skipped:
        logger.warning("%s: skipped %d unreadable files: %s", directory, len(skipped), "; ".join(skipped[:5]))
    y = np.array(labels, dtype=np.int64)
    parts = _split(y, classes, held_out, seed)

    def part(name: str, pixels: list[np.ndarray]) -> Part:
        chosen = parts[name].tolist()
        digest = hashlib.sha256("".join(f"{names[i]}\0{digests[i]}\n" for i in chosen).encode()).hexdigest()
        return Part(name, np.stack([pixels[i] for i in chosen]), y[chosen], [names[i] for i in chosen], digest)

    return LabelledFolder(directory, classes, part("train", squares), part("select", served),
                          part("held_out", served), skipped)  # fmt: skip
