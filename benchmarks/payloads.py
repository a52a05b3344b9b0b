"""What the benchmark sends: scikit-image's photos as JPEG files, and a drawn digit as PNG."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def photos(large: bool) -> list[bytes]:
    """scikit-image's photos as JPEG files: native size, 1600x1200 and (full mode) one 4000x3000."""
    from skimage import data

    images = [Image.fromarray(getattr(data, name)()).convert("RGB") for name in ("chelsea", "coffee", "astronaut")]
    sizes = [None, (1600, 1200)] + ([(4000, 3000)] if large else [])
    files = []
    for size in sizes:
        for image in images if size != (4000, 3000) else images[:1]:
            buffer = io.BytesIO()
            (image if size is None else image.resize(size, Image.Resampling.BICUBIC)).save(buffer, "JPEG", quality=90)
            files.append(buffer.getvalue())
    return files


def photos_at(short_side: int) -> list[bytes]:
    """scikit-image's three photos as JPEG files scaled to ``short_side`` on their shorter side: what a client
    that resizes before sending uploads (ImageNet-sized at 256, the ImageNet networks' resize)."""
    from skimage import data

    files = []
    for name in ("chelsea", "coffee", "astronaut"):
        image = Image.fromarray(getattr(data, name)()).convert("RGB")
        scale = short_side / min(image.size)
        size = (round(image.width * scale), round(image.height * scale))
        buffer = io.BytesIO()
        image.resize(size, Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=90)
        files.append(buffer.getvalue())
    return files


def digit_png() -> bytes:
    canvas = np.full((64, 64), 255, dtype=np.uint8)
    canvas[12:52, 28:36] = 0  # a "1" in dark ink
    buffer = io.BytesIO()
    Image.fromarray(canvas).save(buffer, "PNG")
    return buffer.getvalue()


def payload(model: str, large: bool) -> tuple[list[bytes], str]:
    """The files a model is sent, and their content type."""
    return ([digit_png()], "image/png") if model.startswith("lenet5") else (photos(large), "image/jpeg")
