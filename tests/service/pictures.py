"""The images the quality tests send: digits drawn as the page draws them, and images that are no digits."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw
from skimage import data as photos
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from ..helpers import encode


def drawn(digit: np.ndarray) -> bytes:
    """An 8x8 digit (0..16) drawn in dark ink on a white 64x64 canvas with a margin, as a PNG."""
    ink = Image.fromarray((digit * (255 / 16)).astype(np.uint8)).resize((48, 48), Image.Resampling.BILINEAR)
    canvas = np.full((64, 64), 255, dtype=np.uint8)
    canvas[8:56, 8:56] = 255 - np.asarray(ink)
    return encode(canvas)


def held_out_drawings(count: int) -> tuple[list[bytes], np.ndarray]:
    """The first ``count`` digits of the export's held-out split, drawn, and their labels."""
    digits = load_digits()
    _, images, _, labels = train_test_split(
        digits.images, digits.target, test_size=0.2, random_state=0, stratify=digits.target
    )
    return [drawn(image) for image in images[:count]], labels[:count]


def out_of_distribution(count: int) -> list[bytes]:
    """Uniform noise, patches of scikit-image's photos and printed letters, in turn."""
    rng = np.random.default_rng(0)
    grey = [np.asarray(Image.fromarray(getattr(photos, n)()).convert("L")) for n in ("chelsea", "coffee", "camera")]
    files = []
    for i in range(count):
        if i % 3 == 0:
            files.append(encode(rng.integers(0, 256, (64, 64), dtype=np.uint8)))
        elif i % 3 == 1:
            p = grey[i % len(grey)]
            y, x = rng.integers(0, p.shape[0] - 64), rng.integers(0, p.shape[1] - 64)
            files.append(encode(np.ascontiguousarray(p[y : y + 64, x : x + 64])))
        else:
            letter = Image.new("L", (64, 64), 255)
            ImageDraw.Draw(letter).text((12, 8), "ABEHKMRWX"[i % 9], fill=0, font_size=40)
            files.append(encode(np.asarray(letter)))
    return files
