"""Decoding and preprocessing against references: torchvision's transform, EXIF, odd image modes."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from skimage import data

from service.errors import InvalidInput, PayloadTooLarge
from service.store.metadata import InputMeta
from service.store.preprocess import INLINE_PIXELS, DecodeOffTheLoop, _to_8bit, open_image, preprocess

from ...helpers import encode

IMAGENET = InputMeta(size=224, channels=3, resize=256, crop=224, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
DIGITS = InputMeta(size=32, channels=1, resize=32, crop=32, mean=[0.5], std=[0.5], polarity="light-on-dark")
LIMIT = 100_000_000


def reference(image: Image.Image, resize: int, crop: int) -> np.ndarray:
    """torchvision's Resize(resize) + CenterCrop(crop) on a PIL image, written out."""
    w, h = image.size
    size = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
    resized = image.resize(size, Image.Resampling.BILINEAR)
    left, top = round((size[0] - crop) / 2), round((size[1] - crop) / 2)
    return np.asarray(resized.crop((left, top, left + crop, top + crop)))


@pytest.mark.parametrize("photo", ["chelsea", "coffee", "astronaut", "rocket"])
def test_resize_and_crop_equals_the_reference(photo: str) -> None:
    pixels = getattr(data, photo)()
    out = preprocess(encode(pixels), IMAGENET, max_pixels=LIMIT)
    expected = reference(Image.fromarray(pixels), 256, 224)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    diff = np.abs(out.astype(int) - expected.astype(int))
    assert diff.max() <= 1  # tolerance: one grey level of interpolation rounding
    assert diff.mean() < 0.01


def test_draft_mode_stays_within_tolerance_on_a_large_jpeg() -> None:
    large = np.asarray(Image.fromarray(data.chelsea()).resize((4000, 3000), Image.Resampling.BICUBIC))
    jpeg = encode(large, "JPEG", quality=90)
    expected = reference(Image.open(io.BytesIO(jpeg)).convert("RGB"), 256, 224)
    out = preprocess(jpeg, IMAGENET, max_pixels=LIMIT, draft=True)
    diff = np.abs(out.astype(int) - expected.astype(int))
    assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 4  # tolerance for DCT-domain scaling


def test_exif_rotation_equals_the_upright_image() -> None:
    upright = data.astronaut()
    stored = np.ascontiguousarray(np.rot90(upright))  # what the camera wrote, rotated 90 degrees
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    rotated = io.BytesIO()
    Image.fromarray(stored).save(rotated, "PNG", exif=exif)
    out = preprocess(rotated.getvalue(), IMAGENET, max_pixels=LIMIT)
    np.testing.assert_array_equal(out, preprocess(encode(upright), IMAGENET, max_pixels=LIMIT))


def test_transparency_is_composited_over_white() -> None:
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)  # fully transparent black
    rgba[16:48, 16:48] = (255, 0, 0, 255)  # an opaque red square
    out = preprocess(encode(rgba), IMAGENET, max_pixels=LIMIT)
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[112, 112]) == (255, 0, 0)

    palette = Image.fromarray(rgba[..., :3]).convert("P")
    palette.info["transparency"] = palette.getpixel((0, 0))
    buffer = io.BytesIO()
    palette.save(buffer, "PNG", transparency=palette.getpixel((0, 0)))
    assert tuple(preprocess(buffer.getvalue(), IMAGENET, max_pixels=LIMIT)[0, 0]) == (255, 255, 255)


def test_16_bit_grayscale_is_rescaled_not_clipped() -> None:
    ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (256, 1))
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, "PNG")
    out = preprocess(buffer.getvalue(), IMAGENET, max_pixels=LIMIT)
    assert out[:, 0].max() < 40 and out[:, -1].min() > 215  # dark to light, as in the file
    assert np.all(np.diff(out[100, :, 0].astype(int)) >= 0)


def test_wide_grayscale_is_every_16_bit_value_rounded_to_the_nearest_8_bit_one() -> None:
    """x / 257 rounded (65535 / 255 = 257), for every 16-bit value; float images scaled to their peak."""
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    eight = _to_8bit(Image.fromarray(values))
    np.testing.assert_array_equal(np.asarray(eight), np.round(values / 257.0).astype(np.uint8))
    floats = np.array([[0.0, 0.5], [2.0, 4.0]], dtype=np.float32)
    assert np.asarray(_to_8bit(Image.fromarray(floats))).tolist() == [[0, 32], [128, 255]]
    fractions = np.array([[0.0, 0.25], [0.5, 1.0]], dtype=np.float32)  # 0 to 1: kept as fractions of white
    assert np.asarray(_to_8bit(Image.fromarray(fractions))).tolist() == [[0, 64], [128, 255]]


def test_a_small_file_holding_a_large_image_is_not_decoded_inline() -> None:
    """An 8 KB one-bit PNG of 8000 x 8000 pixels: decoding it on the event loop would stall every request."""
    large = io.BytesIO()
    Image.new("1", (8000, 8000)).save(large, "PNG")
    assert len(large.getvalue()) < 16384  # under INLINE_DECODE_BYTES' default
    with pytest.raises(DecodeOffTheLoop):
        preprocess(large.getvalue(), IMAGENET, max_pixels=LIMIT, inline=True)
    assert preprocess(large.getvalue(), IMAGENET, max_pixels=LIMIT).shape == (224, 224, 3)  # on a thread
    side = int(INLINE_PIXELS**0.5)
    at_the_bound = encode(np.zeros((side, side), np.uint8))
    assert preprocess(at_the_bound, IMAGENET, max_pixels=LIMIT, inline=True).shape == (224, 224, 3)  # inline


def test_cmyk_jpeg_converts_to_rgb() -> None:
    rgb = data.coffee()
    buffer = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(buffer, "JPEG", quality=95)
    out = preprocess(buffer.getvalue(), IMAGENET, max_pixels=LIMIT)
    expected = preprocess(encode(rgb), IMAGENET, max_pixels=LIMIT)
    assert np.abs(out.astype(int) - expected.astype(int)).mean() < 6


def test_lenet_input_inverts_dark_ink_on_white() -> None:
    ink = np.full((64, 64), 255, dtype=np.uint8)
    ink[16:48, 28:36] = 0  # a dark vertical stroke on white paper
    out = preprocess(encode(ink), DIGITS, max_pixels=LIMIT)
    assert out.shape == (32, 32, 1)
    assert out[0, 0, 0] == 0 and out[16, 16, 0] == 255  # light stroke on a dark ground, like MNIST
    # already light-on-dark: left as it is
    assert preprocess(encode(255 - ink), DIGITS, max_pixels=LIMIT)[16, 16, 0] == 255


def _saved(fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(data.coffee()).save(buffer, fmt, **options)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["MPO", "PPM", "TIFF", "BMP", "AVIF"])
def test_the_photo_formats_decode(fmt: str) -> None:
    """MPO is how Pillow reads many cameras' JPEGs; PPM the netpbm family the client sends too; AVIF what image
    CDNs serve."""
    options = {"save_all": True, "append_images": [Image.new("RGB", (8, 8))]} if fmt == "MPO" else {}
    out = preprocess(_saved(fmt, **options), IMAGENET, max_pixels=LIMIT)
    assert np.abs(out.astype(int) - preprocess(encode(data.coffee()), IMAGENET, max_pixels=LIMIT)).mean() < 3


@pytest.mark.parametrize("fmt", ["TGA", "ICO", "PCX"])
def test_formats_outside_the_photo_ones_are_refused_by_name(fmt: str) -> None:
    with pytest.raises(InvalidInput, match=r"send JPEG, PNG, GIF, WebP, AVIF, BMP, TIFF or PNM"):
        preprocess(_saved(fmt), IMAGENET, max_pixels=LIMIT)


@pytest.mark.parametrize("payload", [b"", b"\x00" * 100, b"not an image at all", encode(data.camera())[:300]])
def test_undecodable_input_is_invalid(payload: bytes) -> None:
    with pytest.raises(InvalidInput):
        preprocess(payload, IMAGENET, max_pixels=LIMIT)


def test_the_pixel_limit_is_the_settings_not_the_decoders() -> None:
    """Pillow's own check (a warning past 89 M pixels, an error past 179 M) refused images MAX_IMAGE_PIXELS allows,
    and named its limit, not the setting."""
    buffer = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(buffer, "PNG")  # 100 M pixels in a few kB
    large = buffer.getvalue()
    with pytest.raises(PayloadTooLarge, match=r"10000x10000 = 100,000,000 pixels exceeds the limit of 64,000,000 \("):
        open_image(large, max_pixels=64_000_000)
    assert open_image(large, max_pixels=100_000_000).size == (10_000, 10_000)
    buffer = io.BytesIO()
    Image.new("1", (20_000, 10_000)).save(buffer, "PNG")
    with pytest.raises(PayloadTooLarge, match=r"exceeds the limit of 64,000,000 pixels \(MAX_IMAGE_PIXELS\)"):
        open_image(buffer.getvalue(), max_pixels=64_000_000)
    with pytest.raises(PayloadTooLarge, match=r"the decoder's own limit of 178,956,970 pixels"):
        open_image(buffer.getvalue(), max_pixels=300_000_000)


def test_pixel_limit_is_checked_before_decoding() -> None:
    big = encode(np.zeros((2000, 3000), dtype=np.uint8))
    with pytest.raises(PayloadTooLarge, match=r"3000x2000 = 6,000,000 pixels exceeds the limit of 5,000,000"):
        preprocess(big, IMAGENET, max_pixels=5_000_000)
