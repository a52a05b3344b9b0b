"""Images for calibrating and checking a lower-precision variant, preprocessed exactly as served.

Every image goes through the service's own decoder (``service.store.preprocess``) with the
FP32 version's input spec, so the ranges ONNX Runtime's calibrator sees are the ranges the
served graph will see. Two disjoint sets: the calibration images set the quantization
ranges; the held-out images (never calibrated on) measure what the variant costs.

Defaults, offline: scikit-learn's digits for LeNet-5 (train split to calibrate, test split,
with labels, to check) and scikit-image's bundled photos for the ImageNet networks (a
couple of dozen views of a handful of photos: far fewer than the ~500 images MLPerf and
NVIDIA calibrate on, and unlabelled). ``--calibration-dir`` takes a folder of your own
images, which is the right choice: calibrate on your traffic.
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from service.store.metadata import InputMeta
from service.store.preprocess import preprocess

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
MAX_PIXELS = 100_000_000
# scikit-image's bundled photographs (no download), split by photo so no scene is in both sets.
CALIBRATION_PHOTOS = ("astronaut", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "camera",
                      "coins", "brick", "grass")  # fmt: skip
HELD_OUT_PHOTOS = ("chelsea", "retina", "clock", "horse", "moon", "gravel", "colorwheel")


@dataclass(frozen=True)
class ImageSet:
    """uint8 images ``[N, H, W, C]`` as the graph receives them, and where they came from."""

    source: str
    images: np.ndarray
    labels: np.ndarray | None = None

    @property
    def sha256(self) -> str:
        """The hash of the preprocessed pixels (and labels): what the figures were measured on."""
        digest = hashlib.sha256(np.ascontiguousarray(self.images).tobytes())
        if self.labels is not None:
            digest.update(np.ascontiguousarray(self.labels).tobytes())
        return digest.hexdigest()

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def describe(self) -> dict[str, object]:
        return {"source": self.source, "count": len(self), "sha256": self.sha256, "labelled": self.labels is not None}


def _encode_png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def _served(files: list[bytes], spec: InputMeta) -> np.ndarray:
    return np.stack([preprocess(data, spec, max_pixels=MAX_PIXELS) for data in files])


def from_directory(directory: Path, spec: InputMeta, count: int, option: str = "--calibration-dir") -> ImageSet:
    """Up to ``count`` images from ``directory`` (recursively, sorted by path); ``option`` names it in errors."""
    if not directory.is_dir():
        raise ValueError(f"{option} {directory} is not a directory")
    paths = sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise ValueError(f"{option} {directory} holds no image ({', '.join(sorted(IMAGE_SUFFIXES))})")
    files, skipped = [], []
    for path in paths[:count]:
        data = path.read_bytes()
        try:
            preprocess(data, spec, max_pixels=MAX_PIXELS)
        except Exception as exc:  # a file that does not decode is reported, not fatal
            skipped.append(f"{path.name} ({exc})")
            continue
        files.append(data)
    if skipped:
        logger.warning("%s: skipped %d files that do not decode: %s", option, len(skipped), "; ".join(skipped[:5]))
    if not files:
        raise ValueError(f"{option} {directory}: no file decodes as an image")
    return ImageSet(f"directory {directory} ({len(files)} of {len(paths)} images)", _served(files, spec))


def digits(spec: InputMeta, split: str, seed: int = 0) -> ImageSet:
    """scikit-learn's digits: the ``train`` split to calibrate, the labelled ``test`` split to check."""
    from .train import load_digits_dataset

    data = load_digits_dataset(seed=seed)
    images, labels = (data.x_train, None) if split == "train" else (data.x_test, data.y_test)
    served = _served([_encode_png(x) for x in images], spec)
    return ImageSet(f"scikit-learn digits, {split} split ({data.split})", served, labels)


def _views(pixels: np.ndarray) -> list[np.ndarray]:
    """The whole photo, its four corners at 60% and a mirrored centre: six framings of one scene."""
    height, width = pixels.shape[:2]
    h, w = int(height * 0.6), int(width * 0.6)
    corners = [pixels[:h, :w], pixels[:h, -w:], pixels[-h:, :w], pixels[-h:, -w:]]
    centre = pixels[(height - h) // 2 : (height + h) // 2, (width - w) // 2 : (width + w) // 2, ...][:, ::-1]
    return [pixels, *corners, np.ascontiguousarray(centre)]


def photos(names: tuple[str, ...], spec: InputMeta) -> ImageSet:
    from skimage import data

    files = []
    for name in names:
        pixels = np.asarray(Image.fromarray(getattr(data, name)()).convert("RGB"))
        files += [_encode_png(np.ascontiguousarray(view)) for view in _views(pixels)]
    return ImageSet(f"scikit-image photos {', '.join(names)} (6 views each)", _served(files, spec))


def held_out(spec: InputMeta, seed: int = 0) -> ImageSet:
    """The images a variant is checked on, never calibrated on."""
    if spec.channels == 1:  # LeNet-5: digits, the data it was trained on
        return digits(spec, "test", seed)
    return photos(HELD_OUT_PHOTOS, spec)


def default_calibration(model: str, spec: InputMeta, seed: int = 0) -> ImageSet:
    """The calibration images when the user gives none of their own."""
    if spec.channels == 1:
        return digits(spec, "train", seed)
    calibration = photos(CALIBRATION_PHOTOS, spec)
    logger.warning(
        "%s: calibrating on %d views of %d scikit-image photos; MLPerf and NVIDIA use about 500 images of the real "
        "task. For a model you serve, pass --calibration-dir with a few hundred images of your own traffic.",
        model,
        len(calibration),
        len(CALIBRATION_PHOTOS),
    )
    return calibration
