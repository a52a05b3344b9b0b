"""On a GPU (``make test-gpu``, ``pytest -m gpu``): CUDA sessions take the configured options, answer as the CPU
does per family (FP32 within 1e-3 of a probability, the FP16 variant's top-1 as FP32's), and the served service
warms every batch shape and answers a burst without a failure, its two workers' sessions in one session host.
Skipped where the NVIDIA driver reports no GPU; run as ``pytest -m gpu tests/gpu`` (the other test folders import
tools a GPU machine may lack)."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from service.runtime import cuda, cuda_graphs
from service.runtime.session import load_model
from service.settings import Settings
from service.store.layout import ModelStore

from ..helpers import ServiceProcess, encode, metric_samples, running

# skipped only where the driver reports no GPU: where there is one, CUDA that does not load is a failure (with the
# reason load_model gives), not a skip
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(cuda.gpu_count() == 0, reason="the NVIDIA driver reports no GPU")]

FP32_BOUND = 1e-3  # largest probability difference, CUDA (TF32 on) against the CPU
FP16_BOUND = 1e-2  # the FP16 variant on CUDA against FP32 on the CPU
# largest logit difference as a share of the logits' spread: random-weight networks answer almost uniform
# probabilities, where a probability bound alone would pass anything
FP32_LOGITS = 1e-2  # TF32 inside: a 10-bit mantissa in the products
FP16_LOGITS = 3e-2
TIE = 5e-3  # top-1 compared only where the CPU's first two logits are further apart than this share of the spread


def _cpu(graph: Path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    session = ort.InferenceSession(str(graph), providers=[cuda.CPU])
    logits, probabilities = session.run(["logits", "probabilities"], {"images": images})
    return np.asarray(logits), np.asarray(probabilities)


def _logits_error(expected: np.ndarray, got: np.ndarray) -> float:
    spread = float(expected.max() - expected.min())
    assert spread > 0, "the logits do not vary: nothing to compare"
    return float(np.abs(got.astype(np.float32) - expected).max()) / spread


def _images(size: int, channels: int, count: int = 32) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (count, size, size, channels), dtype=np.uint8)


def _top1_agreement(expected: np.ndarray, got: np.ndarray) -> float | None:
    """Top-1 agreement on logits, over the images whose first two classes are clearly apart; None where fewer than
    half are (random-weight GoogLeNet: its logits span 0.06, every image a near-tie), leaving the logits' bound."""
    ordered = np.sort(expected, axis=1)
    clear = ordered[:, -1] - ordered[:, -2] > TIE * float(expected.max() - expected.min())
    if clear.mean() < 0.5:
        return None
    return float((expected[clear].argmax(1) == got[clear].argmax(1)).mean())


def test_cuda_sessions_take_the_configured_options(model_store: ModelStore) -> None:
    stored = model_store.latest("resnet18")
    assert stored is not None
    model = load_model(model_store, stored, Settings(providers="cuda"))
    assert model.provider == cuda.CUDA and model.batch_sizes == (1, 2, 4, 8, 16, 32)
    options = model.sessions[0].get_provider_options()[cuda.CUDA]
    assert options["cudnn_conv_algo_search"] == "HEURISTIC"
    assert options["prefer_nhwc"] == "0" and options["use_tf32"] == "1"


@pytest.mark.parametrize("name", ["lenet5", "resnet18", "googlenet"])
def test_cuda_answers_as_the_cpu_does(model_store: ModelStore, name: str) -> None:
    stored = model_store.latest(name)
    assert stored is not None
    model = load_model(model_store, stored, Settings(providers="cuda"))
    spec = model.metadata.input
    images = _images(spec.size, spec.channels)
    logits, probabilities = model.runner(0)(images)[:2]
    expected_logits, expected = _cpu(stored.graph, images)
    assert float(np.abs(probabilities - expected).max()) <= FP32_BOUND
    assert _logits_error(expected_logits, logits) <= FP32_LOGITS
    assert _top1_agreement(expected_logits, logits) in (1.0, None)
    if name == "lenet5":  # trained: top-1 always says something
        assert _top1_agreement(expected_logits, logits) == 1.0


def test_the_fp16_variant_agrees_with_fp32(model_store: ModelStore, tmp_path: Path) -> None:
    from export.precision import VariantOptions, export_variant

    store = ModelStore(tmp_path / "store")
    shutil.copytree(model_store.model_dir("resnet18"), store.model_dir("resnet18"))
    export_variant("resnet18", store, VariantOptions("fp16"))
    fp16 = store.latest("resnet18_fp16")
    fp32 = store.latest("resnet18")
    assert fp16 is not None and fp32 is not None
    model = load_model(store, fp16, Settings(providers="cuda"))
    assert model.provider == cuda.CUDA
    assert model.sessions[0].get_provider_options()[cuda.CUDA]["prefer_nhwc"] == "1"
    images = _images(224, 3, 64)
    logits, probabilities = model.runner(0)(images)[:2]
    expected_logits, expected = _cpu(fp32.graph, images)
    assert float(np.abs(probabilities.astype(np.float32) - expected).max()) <= FP16_BOUND
    assert _logits_error(expected_logits, logits) <= FP16_LOGITS
    agreement = _top1_agreement(expected_logits, logits)
    assert agreement is not None and agreement >= 0.99  # random-weight ResNet-18's logits are clearly apart


@pytest.mark.parametrize("name", ["lenet5", "resnet18"])
def test_cuda_graphs_replay_what_cuda_computes(model_store: ModelStore, name: str) -> None:
    """CUDA_GRAPHS=on: each shape's graph, captured at the warm-up, answers every later batch of that shape as a
    session without graphs does (the replay reads the new batch, not the one it was captured with)."""
    stored = model_store.latest(name)
    assert stored is not None
    settings = Settings(providers="cuda", cuda_graphs="on")
    model = load_model(model_store, stored, settings)
    assert model.cuda_graphs and isinstance(model.sessions[0], cuda_graphs.CapturedSession)
    assert model.sessions[0].get_provider_options()[cuda.CUDA]["enable_cuda_graph"] == "1"
    model.warm_up(settings.warmup(model.max_batch_size))
    assert model.sessions[0].graphs == len(model.batch_sizes or ())
    plain = load_model(model_store, stored, Settings(providers="cuda"))
    spec = model.metadata.input
    for seed, batch in enumerate((1, 4, 8, 4, 1)):
        images = np.random.default_rng(seed).integers(0, 256, (batch, spec.size, spec.size, spec.channels),
                                                      dtype=np.uint8)  # fmt: skip
        logits, probabilities = model.runner(0)(images)[:2]
        expected_logits, expected = plain.runner(0)(images)[:2]
        assert float(np.abs(probabilities - expected).max()) <= 1e-4
        assert _logits_error(expected_logits, logits) <= 1e-3
        _, on_cpu = _cpu(stored.graph, images)
        assert float(np.abs(probabilities - on_cpu).max()) <= FP32_BOUND
    assert model.sessions[0].graphs == len(model.batch_sizes or ())  # no shape captured twice


@pytest.fixture(scope="module")
def on_cuda(model_store: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    log = tmp_path_factory.mktemp("gpu_logs") / "service.log"
    with running(Path(model_store.root), log, PROVIDERS="cuda", MODELS="resnet18", MAX_BATCH_SIZE="16",
                 WORKERS="2") as process:  # fmt: skip
        yield process


def test_served_on_cuda_every_shape_warmed_and_a_burst_answered(on_cuda: ServiceProcess,
                                                                 model_store: ModelStore) -> None:  # fmt: skip
    (model,) = [m for m in httpx.get(f"{on_cuda.url}/models", timeout=10).json()["models"] if m["name"] == "resnet18"]
    assert model["provider"] == cuda.CUDA and model["batch_sizes"] == [1, 2, 4, 8, 16]
    assert isinstance(model["session_host"], int)  # SESSION_HOST=auto: CUDA and two workers, one CUDA context
    assert "resnet18 v1: ready on CUDAExecutionProvider" in on_cuda.log_path.read_text()
    pictures = _images(224, 3, 48)

    async def one(client: httpx.AsyncClient, i: int) -> int:
        response = await client.post("/classify", params={"model": "resnet18", "top_k": 1},
                                     content=encode(pictures[i]), headers={"Content-Type": "image/png"})  # fmt: skip
        return response.status_code

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=on_cuda.url, timeout=60) as client:
            return await asyncio.gather(*(one(client, i) for i in range(len(pictures))))

    assert asyncio.run(burst()) == [200] * len(pictures)
    # a lone request of 3 images runs as the shape 4: one zero image, counted, and its answers are the images'
    before = _padding(on_cuda)
    files = [("image", (f"{i}.png", encode(pictures[i]), "image/png")) for i in range(3)]
    response = httpx.post(f"{on_cuda.url}/classify", params={"model": "resnet18"}, files=files, timeout=60)
    assert response.status_code == 200 and len(response.json()["results"]) == 3
    assert _padding(on_cuda) == before + 1


def _padding(service: ServiceProcess) -> float:
    text = httpx.get(f"{service.url}/metrics", timeout=10).text
    samples = metric_samples(text, "cnn_batch_padding_images_total")
    return sum(v for labels, v in samples if labels["model"] == "resnet18")
