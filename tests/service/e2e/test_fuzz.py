"""Fuzzing: hypothesis on decoding and preprocessing, schemathesis on the HTTP API."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from service.errors import InvalidInput, PayloadTooLarge
from service.frontends.v2.handler import DTYPES
from service.frontends.v2.rest import parse_infer_request, requested_outputs
from service.store.layout import ModelStore
from service.store.metadata import InputMeta
from service.store.preprocess import preprocess

from ...helpers import ROOT, ServiceProcess, running

SPECS = [
    InputMeta(size=224, channels=3, resize=256, crop=224, mean=[0.5] * 3, std=[0.5] * 3),
    InputMeta(size=32, channels=1, resize=32, crop=32, mean=[0.5], std=[0.5], polarity="light-on-dark"),
]
MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F"]
FORMATS = {
    "PNG": {"1", "L", "LA", "P", "RGB", "RGBA", "I;16"},
    "JPEG": {"L", "RGB", "CMYK"},
    "BMP": {"1", "L", "P", "RGB"},
    "GIF": {"L", "P"},
    "WEBP": {"RGB", "RGBA"},
    "TIFF": set(MODES) - {"LA"},
}


def _check(spec: InputMeta, data: bytes) -> None:
    try:
        out = preprocess(data, spec, max_pixels=4_000_000)
    except (InvalidInput, PayloadTooLarge):
        return  # the only errors a client can cause
    assert out.shape == (spec.size, spec.size, spec.channels) and out.dtype == np.uint8


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=4096), spec=st.sampled_from(SPECS))
def test_arbitrary_bytes_fail_only_as_client_errors(data: bytes, spec: InputMeta) -> None:
    _check(spec, data)


@st.composite
def encoded_images(draw: st.DrawFn) -> bytes:
    fmt = draw(st.sampled_from(sorted(FORMATS)))
    mode = draw(st.sampled_from(sorted(FORMATS[fmt])))
    width, height = draw(st.integers(1, 300)), draw(st.integers(1, 300))
    seed = draw(st.integers(0, 2**32 - 1))
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode if mode not in ("I;16", "I", "F") else "L")
    if mode in ("I;16", "I", "F"):
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=encoded_images(), spec=st.sampled_from(SPECS))
def test_any_valid_image_preprocesses_to_the_contract(data: bytes, spec: InputMeta) -> None:
    out = preprocess(data, spec, max_pixels=4_000_000)
    assert out.shape == (spec.size, spec.size, spec.channels) and out.dtype == np.uint8


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=encoded_images(),
    spec=st.sampled_from(SPECS),
    flips=st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)), min_size=1, max_size=8),
)
def test_corrupted_images_fail_only_as_client_errors(data: bytes, spec: InputMeta, flips: list) -> None:
    corrupted = bytearray(data)
    for where, value in flips:
        corrupted[int(where * (len(corrupted) - 1))] ^= value
    _check(spec, bytes(corrupted))


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=6),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)
DIMENSION = st.integers(-2, 4) | st.integers(2**31, 2**70)
INPUT = st.fixed_dictionaries(
    {},
    optional={
        "name": st.sampled_from(["images", "image_bytes", "x"]) | JSON,
        "datatype": st.sampled_from([*DTYPES, "BYTES", "FP8"]) | JSON,
        "shape": st.lists(DIMENSION, max_size=4) | JSON,
        "data": st.lists(st.integers(-1, 2**65) | st.text(max_size=3) | JSON, max_size=8) | JSON,
        "parameters": st.fixed_dictionaries({"binary_data_size": st.integers(-1, 80) | JSON}) | JSON,
    },
)
OUTPUT = st.fixed_dictionaries(
    {},
    optional={
        "name": st.sampled_from(["probabilities", "logits"]) | JSON,
        "parameters": st.fixed_dictionaries(
            {}, optional={"classification": st.integers(-1, 2**64) | JSON, "binary_data": JSON}
        )
        | JSON,
    },
)
INFER = st.fixed_dictionaries(
    {"inputs": st.lists(INPUT, max_size=3) | JSON},
    optional={
        "outputs": st.lists(OUTPUT, max_size=3) | JSON,
        "parameters": st.fixed_dictionaries({}, optional={"binary_data_output": JSON}) | JSON,
        "id": JSON,
    },
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header=INFER, binary=st.binary(max_size=80))
def test_any_v2_json_request_parses_or_fails_as_a_client_error(header: dict, binary: bytes) -> None:
    """The Open Inference Protocol's JSON (with binary tensor data after it): whatever its fields hold, parsing
    either gives tensors of the shapes they declare or a 4xx that says which field is wrong."""
    text = json.dumps(header).encode()
    try:
        parsed, tensors = parse_infer_request(text + binary, str(len(text)))
        requested_outputs(parsed)
    except (InvalidInput, PayloadTooLarge) as exc:
        assert exc.message
        return
    for tensor in tensors:
        assert list(tensor.data.shape) == tensor.shape or tensor.datatype == "BYTES"


@pytest.fixture(scope="module")
def healthy_service(model_store: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """Every model loads: a 5xx found here is a bug, not the deliberate 503 of a model that failed to load."""
    log = tmp_path_factory.mktemp("logs") / "fuzzed.log"
    with running(Path(model_store.root), log, MODELS="lenet5,resnet18") as process:
        yield process


@pytest.mark.integration
def test_openapi_fuzzing_finds_no_server_error(healthy_service: ServiceProcess) -> None:
    """schemathesis generates requests from the service's own OpenAPI document; none may answer 5xx."""
    service = healthy_service
    schemathesis = Path(sys.executable).parent / "schemathesis"
    result = subprocess.run(
        [str(schemathesis), "run", f"{service.url}/docs.json", "--checks", "not_a_server_error",
         "--max-examples", "30", "--seed", "1", "--request-timeout", "30", "--phases", "examples,coverage,fuzzing"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    generated = re.search(r"(\d+) generated", result.stdout)
    assert generated and int(generated.group(1)) >= 100, result.stdout[-2000:]
    assert re.search(r"Tested:\s+(\d+)", result.stdout) and "/docs.json" in result.stdout
