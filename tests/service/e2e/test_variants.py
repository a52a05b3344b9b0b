"""Precision variants, model instances and batch shapes, served: the INT8 graph answers over HTTP and gRPC as it
does run directly, two instances answer correctly under concurrency with every batch of 2 or 3 padded to 4
(BATCH_SIZES=4: shapes 1 and 4), FP16 is refused on the CPU."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton_grpc

from export.precision import VariantOptions, export_variant
from service.store.layout import ModelStore

from ...helpers import ServiceProcess, encode, metric_samples, running

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def variant_store(model_store: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    store = ModelStore(tmp_path_factory.mktemp("variant_store"))
    shutil.copytree(model_store.model_dir("lenet5"), store.model_dir("lenet5"))
    export_variant("lenet5", store, VariantOptions("int8"))
    export_variant("lenet5", store, VariantOptions("fp16"))
    return store


@pytest.fixture(scope="module")
def variants(variant_store: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    log = tmp_path_factory.mktemp("variant_logs") / "service.log"
    with running(Path(variant_store.root), log, INSTANCES="2", PROVIDERS="auto", MAX_BATCH_SIZE="4",
                 BATCH_SIZES="4") as process:  # fmt: skip
        yield process


def direct(store: ModelStore, model: str, pixels: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(store.latest(model).graph), providers=["CPUExecutionProvider"])  # type: ignore[union-attr]
    (probabilities,) = session.run(["probabilities"], {"images": pixels})
    return np.asarray(probabilities)


def digit_pixels(count: int) -> np.ndarray:
    """Held-out digits as the graph's uint8 [N, 32, 32, 1], light on dark."""
    from export.train import load_digits_dataset

    return load_digits_dataset().x_test[:count, :, :, None]


def test_models_show_precision_derivation_and_accuracy(variants: ServiceProcess, variant_store: ModelStore) -> None:
    models = {m["name"]: m for m in httpx.get(f"{variants.url}/models", timeout=10).json()["models"]}
    assert models["lenet5"]["precision"] == "fp32" and models["lenet5"]["derived_from"] is None
    int8 = models["lenet5_int8"]
    assert int8["status"] == "ready" and int8["precision"] == "int8" and int8["forced"] is False
    parent = variant_store.latest("lenet5")
    assert parent is not None
    assert int8["derived_from"]["model"] == "lenet5" and int8["derived_from"]["version"] == parent.version
    assert int8["accuracy"]["top1_agreement"] >= 0.99 and int8["accuracy"]["accuracy_drop"] <= 0.5
    v2 = httpx.get(f"{variants.url}/v2/models/lenet5_int8", timeout=10).json()
    assert v2["parameters"]["precision"] == "int8" and v2["parameters"]["accuracy"] == int8["accuracy"]


def test_fp16_is_refused_on_the_cpu_with_its_reason(variants: ServiceProcess) -> None:
    models = {m["name"]: m for m in httpx.get(f"{variants.url}/models", timeout=10).json()["models"]}
    fp16 = models["lenet5_fp16"]
    assert fp16["status"] == "failed"
    assert "FP16 variant is served on CUDA only" in fp16["reason"] and "CPUExecutionProvider" in fp16["reason"]
    response = httpx.post(f"{variants.url}/classify", params={"model": "lenet5_fp16"}, content=encode(
        np.zeros((32, 32), np.uint8)), headers={"Content-Type": "image/png"}, timeout=10)  # fmt: skip
    assert response.status_code == 503 and "CUDA only" in response.json()["error"]
    other = httpx.post(f"{variants.url}/classify", params={"model": "lenet5_int8"}, content=encode(
        np.zeros((32, 32), np.uint8)), headers={"Content-Type": "image/png"}, timeout=10)  # fmt: skip
    assert other.status_code == 200  # the other models serve on


def test_int8_over_grpc_equals_its_graph_run_directly(variants: ServiceProcess, variant_store: ModelStore) -> None:
    pixels = digit_pixels(12)
    tensor = triton_grpc.InferInput("images", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels)
    result = triton_grpc.InferenceServerClient(variants.grpc_target).infer("lenet5_int8", [tensor])
    expected = direct(variant_store, "lenet5_int8", pixels)
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=1e-5)
    # and it is not the FP32 graph answering
    assert not np.allclose(expected, direct(variant_store, "lenet5", pixels), atol=1e-6)


def test_int8_over_http_under_concurrency_with_two_instances(
    variants: ServiceProcess, variant_store: ModelStore
) -> None:
    """48 concurrent /classify calls on two instances, every batch of more than one padded to 4 images: every
    answer is its own image's, as the graph says, and the padding is counted, never answered."""
    pixels = digit_pixels(48)
    expected = direct(variant_store, "lenet5_int8", pixels)
    before = _batches(variants)

    async def one(client: httpx.AsyncClient, i: int) -> dict[str, float]:
        response = await client.post(
            "/classify", params={"model": "lenet5_int8", "top_k": 10}, content=encode(pixels[i, :, :, 0]),
            headers={"Content-Type": "image/png"},
        )  # fmt: skip
        assert response.status_code == 200, response.text
        return {p["label"]: p["score"] for p in response.json()["results"][0]["predictions"]}

    async def everyone() -> list[dict[str, float]]:
        async with httpx.AsyncClient(base_url=variants.url, timeout=60) as client:
            return await asyncio.gather(*(one(client, i) for i in range(len(pixels))))

    answers = asyncio.run(everyone())
    for i, scores in enumerate(answers):
        np.testing.assert_allclose([scores[str(c)] for c in range(10)], expected[i], atol=1e-5)
    assert _batches(variants) > before
    padded = _padding(variants)
    files = [("image", (f"{i}.png", encode(pixels[i, :, :, 0]), "image/png")) for i in range(2)]
    pair = httpx.post(f"{variants.url}/classify", params={"model": "lenet5_int8", "top_k": 10}, files=files,
                      timeout=10)  # fmt: skip
    for i, result in enumerate(pair.json()["results"]):  # 2 images + 2 zeros
        scores = {p["label"]: p["score"] for p in result["predictions"]}
        np.testing.assert_allclose([scores[str(c)] for c in range(10)], expected[i], atol=1e-5)
    assert _padding(variants) == padded + 2
    models = {m["name"]: m for m in httpx.get(f"{variants.url}/models", timeout=10).json()["models"]}
    assert models["lenet5_int8"]["batch_sizes"] == [1, 4] and models["lenet5"]["batch_sizes"] == [1, 4]
    assert "lenet5_int8 v1: ready on CPUExecutionProvider" in variants.log_path.read_text()
    assert "2 instance(s) of 1 threads, batches of up to 4 in shapes [1, 4])" in variants.log_path.read_text()


def _batches(service: ServiceProcess) -> float:
    text = httpx.get(f"{service.url}/metrics", timeout=10).text
    return sum(v for labels, v in metric_samples(text, "cnn_batch_size_count") if labels["model"] == "lenet5_int8")


def _padding(service: ServiceProcess) -> float:
    text = httpx.get(f"{service.url}/metrics", timeout=10).text
    samples = metric_samples(text, "cnn_batch_padding_images_total")
    return sum(v for labels, v in samples if labels["model"] == "lenet5_int8")
