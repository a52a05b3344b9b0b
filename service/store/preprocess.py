"""Encoded image bytes -> the uint8 pixels a graph takes, as torchvision's eval transform makes them.

For the ImageNet releases that is ``Resize(256, bilinear)`` then ``CenterCrop(224)`` on
the RGB image; for LeNet-5, grayscale at 32x32 with light strokes on a dark ground. All
sizes come from the model's metadata. The resize only computes the pixels the crop keeps
(Pillow's ``box``), which equals resize-then-crop up to interpolation rounding and is much
cheaper for large or very elongated images.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import (  # the plugins of FORMATS, registered: Image.open(formats=...) uses only those already registered
    AvifImagePlugin,  # noqa: F401 - what image CDNs serve and browsers save
    BmpImagePlugin,  # noqa: F401
    GifImagePlugin,  # noqa: F401
    Image,
    ImageOps,
    JpegImagePlugin,  # noqa: F401
    MpoImagePlugin,  # noqa: F401 - JPEG's opener hands MPO files to it
    PngImagePlugin,  # noqa: F401
    PpmImagePlugin,  # noqa: F401
    TiffImagePlugin,  # noqa: F401
    UnidentifiedImageError,
    WebPImagePlugin,  # noqa: F401
)

from ..errors import InvalidInput, PayloadTooLarge
from .metadata import InputMeta

_ALPHA_MODES = {"RGBA", "LA", "La", "RGBa", "PA"}
_WIDE_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
# The decoders Pillow may use: photos' formats (JPEG's opens many cameras' MPO files too) and the netpbm family;
# none of the rarely used ones (EPS would start Ghostscript where it is installed; each decoder is attack surface).
FORMATS = tuple(  # those this Pillow build registered: a build without AVIF opens the others
    f for f in ("JPEG", "PNG", "GIF", "WEBP", "AVIF", "BMP", "TIFF", "PPM") if f in Image.OPEN
)

# An image decoded on the event loop (INLINE_DECODE_BYTES) has at most this many pixels: a small file can hold a
# large image (an 8000 x 8000 one-bit PNG is 8 KB and takes half a second to decode), and the loop serves every
# other request meanwhile. 512 x 512 decodes in about 2 ms.
INLINE_PIXELS = 512 * 512


class DecodeOffTheLoop(Exception):
    """Raised by :func:`open_image` given ``inline=True`` where the header names more than :data:`INLINE_PIXELS`:
    the caller decodes it on a thread instead."""


# The limit is MAX_IMAGE_PIXELS, checked in open_image: Pillow's own warning (past 89 M pixels) refused images the
# setting allows, in Pillow's words. Set once here: warnings.catch_warnings per image changes the process's
# filters under the other decoding threads (it is not thread-safe).
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

# DCT scaling keeps at least this multiple of the resize target, so the bilinear
# resize still does the final, anti-aliased reduction.
_DRAFT_FACTOR = 2


def open_image(data: bytes, max_pixels: int, *, draft_to: int | None = None, inline: bool = False) -> Image.Image:
    """Decode ``data`` (first frame), EXIF-oriented; the size is checked before decoding (``inline``: also against
    :data:`INLINE_PIXELS`, raising :class:`DecodeOffTheLoop` above it)."""
    if not data:
        raise InvalidInput("Empty image: the request carried no bytes where an image was expected")
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
        width, height = image.size
        if width * height > max_pixels:
            raise PayloadTooLarge(
                f"Image of {width}x{height} = {width * height:,} pixels exceeds the limit of {max_pixels:,} "
                "(MAX_IMAGE_PIXELS)"
            )
        if inline and width * height > INLINE_PIXELS:
            raise DecodeOffTheLoop
        if draft_to is not None and image.format == "JPEG":
            image.draft("RGB", (draft_to * _DRAFT_FACTOR, draft_to * _DRAFT_FACTOR))
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of an upright image
        return image
    except (PayloadTooLarge, DecodeOffTheLoop):
        raise
    except Image.DecompressionBombError as exc:  # past twice Pillow's limit, refused before the size is known here
        ceiling = 2 * (Image.MAX_IMAGE_PIXELS or 0)
        if max_pixels < ceiling:
            limit = f"{max_pixels:,} pixels (MAX_IMAGE_PIXELS)"
            raise PayloadTooLarge(f"Image exceeds the limit of {limit}: {exc}") from None
        raise PayloadTooLarge(f"Image exceeds the decoder's own limit of {ceiling:,} pixels, which MAX_IMAGE_PIXELS "
                              f"cannot raise: {exc}") from None  # fmt: skip
    except UnidentifiedImageError:
        raise InvalidInput(
            "Cannot decode the image: send JPEG, PNG, GIF, WebP, AVIF, BMP, TIFF or PNM (PBM, PGM, PPM)"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidInput(f"Cannot decode the image: {exc}") from None


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and float grayscale -> 8-bit, scaling the range rather than clipping it.

    Integers in 32-bit integer arithmetic (round(x / 257) is (x + 128) // 257: x / 257 is never a half), floats in
    32-bit floats: a float64 copy of a 64-megapixel image took 4.6 s and 1.6 GB."""
    if image.mode != "F":
        wide = np.asarray(image)
        if wide.dtype.kind == "i":  # mode I: 32-bit signed
            wide = np.clip(wide, 0, 65535)
        scaled = wide.astype(np.uint32)  # the one copy: scaled in place
        scaled += 128
        scaled //= 257
        return Image.fromarray(scaled.astype(np.uint8), mode="L")
    array = np.asarray(image, dtype=np.float32)
    top = max(float(array.max()), 1.0)  # values from 0 to 1 stay so; larger ones are scaled to their peak
    return Image.fromarray(np.clip(array * np.float32(255.0 / top), 0, 255).round().astype(np.uint8), mode="L")


def to_mode(image: Image.Image, channels: int) -> Image.Image:
    """RGB or L, with transparency composited over white and wide grayscale rescaled."""
    if image.mode in _WIDE_MODES:
        image = _to_8bit(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB" if channels == 3 else "L")


def crop_box(width: int, height: int, resize: int, crop: int) -> tuple[float, float, float, float]:
    """The source region that ``Resize(resize)`` + ``CenterCrop(crop)`` keep, in source pixels.

    Sizes are computed as torchvision computes them (the long side truncated, the crop
    offset rounded), so the region matches its transform.
    """
    if width <= height:
        new_w, new_h = resize, int(resize * height / width)
    else:
        new_w, new_h = int(resize * width / height), resize
    top = round((new_h - crop) / 2.0)
    left = round((new_w - crop) / 2.0)
    sx, sy = width / new_w, height / new_h
    return (left * sx, top * sy, (left + crop) * sx, (top + crop) * sy)


def resize_and_crop(image: Image.Image, resize: int, crop: int) -> Image.Image:
    box = crop_box(image.width, image.height, resize, crop)
    return image.resize((crop, crop), Image.Resampling.BILINEAR, box=box)


def preprocess(
    data: bytes, spec: InputMeta, *, max_pixels: int, draft: bool = True, inline: bool = False
) -> np.ndarray:
    """Encoded image -> uint8 array ``[size, size, channels]``, ready for the graph's ``images`` (``inline``: see
    :func:`open_image`)."""
    image = open_image(data, max_pixels, draft_to=spec.resize if draft else None, inline=inline)
    return pixels_of(image, spec, spec.crop)


def pixels_of(image: Image.Image, spec: InputMeta, crop: int) -> np.ndarray:
    """A decoded image -> uint8 ``[crop, crop, channels]``: ``spec``'s mode, its resize and a centre crop of
    ``crop`` (the served one is ``spec.crop``; fine-tuning takes the whole ``resize`` square to crop at random),
    its polarity."""
    image = resize_and_crop(to_mode(image, spec.channels), spec.resize, crop)
    pixels = np.asarray(image, dtype=np.uint8)
    if spec.channels == 1:
        pixels = pixels[:, :, None]
    if spec.polarity == "light-on-dark" and _border_mean(pixels) > 127:
        pixels = 255 - pixels  # a dark drawing on a light ground
    return np.ascontiguousarray(pixels)


def _border_mean(pixels: np.ndarray) -> float:
    """The mean of the first and last rows and columns (corners count twice)."""
    edges = (pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1])
    return sum(int(edge.sum()) for edge in edges) / sum(edge.size for edge in edges)


def warm_up(spec: InputMeta) -> None:
    """Decode a small PNG and JPEG once, so the first request does not pay for Pillow's plugins (~20 ms)."""
    image = Image.new("RGB", (16, 16), (128, 64, 32))
    for fmt in ("PNG", "JPEG"):
        buffer = io.BytesIO()
        image.save(buffer, fmt)
        preprocess(buffer.getvalue(), spec, max_pixels=16 * 16)
