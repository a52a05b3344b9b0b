"""Whatever a client sends costs it a clear 4xx and the service nothing; unusual but valid images classify."""

from __future__ import annotations

import io
import json
import socket
import struct
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image
from skimage import data

from ...helpers import ServiceProcess, classify, encode
from ..pictures import held_out_drawings

pytestmark = pytest.mark.integration

PHOTO = data.astronaut()
JPEG = encode(PHOTO, "JPEG", quality=90)
PNG = encode(PHOTO, "PNG")
DIGIT_PNG = encode(np.pad(np.full((20, 4), 255, dtype=np.uint8), 6))


def assert_still_serving(service: ServiceProcess) -> None:
    assert classify(service, JPEG, model="resnet18").status_code == 200
    assert httpx.get(f"{service.url}/readyz", timeout=5).status_code == 200


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with almost no data behind it."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


BAD_BODIES = [
    ("empty body", b"", "image/jpeg", 400),
    ("random bytes", np.random.default_rng(0).bytes(4096), "application/octet-stream", 400),
    ("text sent as image/jpeg", b"Dear service, this is not a photo.\n" * 20, "image/jpeg", 400),
    ("truncated JPEG", JPEG[: len(JPEG) // 3], "image/jpeg", 400),
    ("truncated PNG", PNG[: len(PNG) // 3], "image/png", 400),
    ("PNG claiming 50000 x 50000", png_claiming(50_000, 50_000), "image/png", 413),
    ("body over the limit", b"\0" * (20 * 1024 * 1024 + 1), "image/jpeg", 413),
    ("unsupported content type", JPEG, "application/json", 415),
    ("no content type", JPEG, "", 415),
]


@pytest.mark.parametrize(("case", "body", "content_type", "status"), BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
def test_bad_bodies(service: ServiceProcess, case: str, body: bytes, content_type: str, status: int) -> None:
    response = classify(service, body, content_type, model="resnet18")
    assert response.status_code == status, response.text
    assert response.json()["error"]
    assert_still_serving(service)


BAD_PARAMETERS = [
    ("model unknown", {"model": "resnet5"}, 404),
    ("model empty", {"model": ""}, 400),
    ("model with ../", {"model": "../../etc/passwd"}, 400),
    ("model with a slash", {"model": "resnet18/1"}, 400),
    ("model with NUL", {"model": "resnet18\x00"}, 400),
    ("top_k 0", {"top_k": 0}, 400),
    ("top_k -1", {"top_k": -1}, 400),
    ("top_k abc", {"top_k": "abc"}, 400),
    ("top_k 10**9", {"top_k": 10**9}, 400),
    ("version absent", {"version": 99}, 404),
    ("model with a trailing newline", {"model": "resnet18\n"}, 400),
    ("a parameter misspelt", {"modle": "lenet5"}, 400),
]


@pytest.mark.parametrize(("case", "params", "status"), BAD_PARAMETERS, ids=[c[0] for c in BAD_PARAMETERS])
def test_bad_parameters(service: ServiceProcess, case: str, params: dict, status: int) -> None:
    response = classify(service, JPEG, **{"model": "resnet18", **params})
    assert response.status_code == status, response.text
    assert response.json()["error"]
    assert_still_serving(service)


def test_a_misspelt_parameter_is_named_with_those_the_route_takes(service: ServiceProcess) -> None:
    response = classify(service, JPEG, model="resnet18", topk=1)
    assert response.status_code == 400
    takes = "model, top_k, version, min_confidence"
    assert response.json()["error"] == f"Unknown parameter 'topk': this route takes {takes}"


def test_more_files_than_the_limit_allows_is_413_however_many(service: ServiceProcess) -> None:
    """65 files (one over MAX_IMAGES_PER_REQUEST=64) and 66 (past the form parser's own limit of 65) alike."""
    small = encode(np.zeros((8, 8), dtype=np.uint8))
    for count in (65, 66, 200):
        files = [("image", (f"{i}.png", small, "image/png")) for i in range(count)]
        response = httpx.post(f"{service.url}/classify", params={"model": "lenet5"}, files=files, timeout=30)
        assert response.status_code == 413, (count, response.text)
        assert "at most 64 per request (MAX_IMAGES_PER_REQUEST)" in response.json()["error"]
    assert_still_serving(service)


def test_a_multipart_body_without_its_boundary_says_how_to_send_files(service: ServiceProcess) -> None:
    response = classify(service, b"--x\r\n", "multipart/form-data", model="lenet5")
    assert response.status_code == 400
    assert response.json()["error"].startswith("Malformed multipart body: Missing boundary")
    assert "curl -F image=@cat.jpg" in response.json()["error"]
    part = b'--x\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n' + DIGIT_PNG + b"\r\n"
    for content_type, body, says in (
        ("multipart/form-data; boundary=", b"", "its Content-Type names an empty boundary"),
        ("multipart/form-data; boundary=x", part, "it does not end with the closing boundary --x--"),
        ("multipart/form-data; boundary=x", b"--x--\r\n", "The multipart form holds no file"),
    ):
        response = classify(service, body, content_type, model="lenet5")
        assert response.status_code == 400 and says in response.json()["error"], response.text
    assert classify(service, part + b"--x--\r\n", "multipart/form-data; boundary=x", model="lenet5").status_code == 200


def test_a_wrong_method_or_path_is_a_json_error_that_says_what_is_there(service: ServiceProcess) -> None:
    wrong_method = httpx.get(f"{service.url}/classify", timeout=10)
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
    assert wrong_method.json() == {"error": "GET is not allowed on /classify: use POST"}
    # under a route of the app, and where no route is (BentoML's router answered those in plain text)
    for path in ("/page/nowhere.js", "/nothing", "/v2/models/lenet5/config", "/v2/models//ready"):
        nowhere = httpx.get(f"{service.url}{path}", timeout=10)
        assert nowhere.status_code == 404 and len(nowhere.headers["x-request-id"]) == 32
        assert nowhere.json() == {"error": f"Nothing at {path}: the API reference is at /docs"}
    for probe in ("/livez", "/readyz", "/healthz"):  # BentoML's own routes: its 405 was plain text too
        posted = httpx.post(f"{service.url}{probe}", timeout=10)
        assert posted.status_code == 405 and "GET" in posted.headers["allow"], posted.headers
        assert posted.json() == {"error": f"POST is not allowed on {probe}: use {posted.headers['allow']}"}


@pytest.mark.parametrize(
    "head",
    [b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
     b"GET /healthz HTTP/1.1\r\nHost x\r\n\r\n"],
    ids=["content-length not a number", "header without a colon"],
)  # fmt: skip
def test_a_request_that_is_not_http_gets_a_json_400(service: ServiceProcess, head: bytes) -> None:
    with socket.create_connection(("127.0.0.1", service.port), timeout=10) as connection:
        connection.sendall(head)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    status, _, rest = answer.partition(b"\r\n")
    headers, _, body = rest.partition(b"\r\n\r\n")
    assert status == b"HTTP/1.1 400 Bad Request" and b"content-type: application/json" in headers.lower()
    assert "not valid HTTP/1.1" in json.loads(body)["error"]
    assert_still_serving(service)


def _save(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _animated(fmt: str) -> bytes:
    frames = [Image.fromarray(PHOTO), Image.fromarray(255 - PHOTO)]
    return _save(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


rgb = Image.fromarray(PHOTO)
rgba = rgb.copy()
rgba.putalpha(200)
palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE)
UNUSUAL = [
    ("grayscale", _save(rgb.convert("L"), "PNG"), "image/png"),
    ("grayscale with alpha", _save(rgb.convert("LA"), "PNG"), "image/png"),
    ("RGBA", _save(rgba, "PNG"), "image/png"),
    ("palette with transparency", _save(palette, "PNG", transparency=0), "image/png"),
    ("CMYK JPEG", _save(rgb.convert("CMYK"), "JPEG"), "image/jpeg"),
    ("progressive JPEG", _save(rgb, "JPEG", progressive=True), "image/jpeg"),
    ("16-bit PNG", _save(Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257), "PNG"), "image/png"),
    ("animated GIF", _animated("GIF"), "image/gif"),
    ("animated WebP", _animated("WEBP"), "image/webp"),
    ("BMP", _save(rgb, "BMP"), "image/bmp"),
    ("TIFF", _save(rgb, "TIFF"), "image/tiff"),
    ("1x1 pixel", _save(Image.new("RGB", (1, 1), (200, 30, 30)), "PNG"), "image/png"),
    ("10000x10", _save(Image.new("RGB", (10_000, 10), (30, 200, 30)), "PNG"), "image/png"),
    # under INLINE_DECODE_BYTES, over the pixels decoded on the event loop: decoded on a thread
    ("8 KB one-bit PNG of 8000x8000", _save(Image.new("1", (8000, 8000)), "PNG"), "image/png"),
]


@pytest.mark.parametrize(("case", "body", "content_type"), UNUSUAL, ids=[c[0] for c in UNUSUAL])
def test_unusual_images_classify(service: ServiceProcess, case: str, body: bytes, content_type: str) -> None:
    response = classify(service, body, content_type, model="resnet18")
    assert response.status_code == 200, response.text
    assert len(response.json()["results"][0]["predictions"]) == 5


def test_animated_images_use_the_first_frame(service: ServiceProcess) -> None:
    """Two drawn digits that the trained LeNet-5 tells apart, as the two frames of one file, in either order."""

    def top1(body: bytes, content_type: str) -> int:
        response = classify(service, body, content_type, model="lenet5", top_k=1)
        assert response.status_code == 200, response.text
        return int(response.json()["results"][0]["predictions"][0]["index"])

    files, _ = held_out_drawings(10)
    alone = [top1(file, "image/png") for file in files]
    pair = (0, next(i for i, answer in enumerate(alone) if answer != alone[0]))
    frames = {i: Image.open(io.BytesIO(files[i])) for i in pair}
    for fmt in ("GIF", "WEBP"):
        for first, second in (pair, pair[::-1]):
            body = _save(frames[first], fmt, save_all=True, append_images=[frames[second]], duration=100, loop=0)
            assert Image.open(io.BytesIO(body)).n_frames == 2
            assert top1(body, f"image/{fmt.lower()}") == alone[first], (fmt, first)


def test_exif_rotation_gives_the_upright_result(service: ServiceProcess) -> None:
    upright = classify(service, JPEG, model="resnet18", top_k=1000).json()["results"][0]["predictions"]
    exif = Image.Exif()
    exif[0x0112] = 8  # the file holds the photo turned 90 degrees clockwise; display rotates it back
    rotated = _save(Image.fromarray(np.ascontiguousarray(np.rot90(PHOTO, k=-1))), "JPEG", quality=90, exif=exif)
    turned = classify(service, rotated, model="resnet18", top_k=1000).json()["results"][0]["predictions"]
    ignored = _save(Image.fromarray(np.ascontiguousarray(np.rot90(PHOTO, k=-1))), "JPEG", quality=90)
    sideways = classify(service, ignored, model="resnet18", top_k=1000).json()["results"][0]["predictions"]
    a, b, c = ({p["index"]: p["score"] for p in answer} for answer in (upright, turned, sideways))
    assert upright[0]["index"] == turned[0]["index"]
    assert max(abs(a[i] - b[i]) for i in a) < 2e-3  # JPEG re-encoding of the rotated pixels, nothing more
    print(
        f"largest score difference: with the EXIF tag {max(abs(a[i] - b[i]) for i in a):.2e}, "
        f"without {max(abs(a[i] - c[i]) for i in a):.2e}"
    )
    assert max(abs(a[i] - c[i]) for i in a) > 2e-3  # the bound tells the photo turned sideways from upright
