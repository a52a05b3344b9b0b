"""Is the model still right: drift of live answers from the export's baseline, on the real service."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.store.layout import ModelStore

from ...helpers import ServiceProcess, metric_samples, running
from ..pictures import held_out_drawings, out_of_distribution

pytestmark = pytest.mark.integration

WINDOW = 100
THRESHOLD = 0.1  # the CNNPredictionDrift alert's (monitoring/alerts.yml)


@pytest.fixture(scope="module")
def lenet5_alone(model_store: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """One worker, so that every answer is in the one window the test reads."""
    log = tmp_path_factory.mktemp("drift") / "service.log"
    with running(Path(model_store.root), log, MODELS="lenet5", WORKERS="1", DRIFT_WINDOW=str(WINDOW)) as process:
        yield process


def send(service: ServiceProcess, files: list[bytes]) -> None:
    for start in range(0, len(files), 25):
        parts = [("image", (f"{i}.png", f, "image/png")) for i, f in enumerate(files[start : start + 25])]
        response = httpx.post(f"{service.url}/classify", params={"model": "lenet5"}, files=parts, timeout=60)
        assert response.status_code == 200, response.text


def drift(service: ServiceProcess) -> dict[str, float]:
    text = httpx.get(f"{service.url}/metrics", timeout=10).text
    window = {labels["version"]: v for labels, v in metric_samples(text, "cnn_prediction_drift_window")}
    assert list(window.values()) == [WINDOW]
    return {labels["kind"]: v for labels, v in metric_samples(text, "cnn_prediction_drift")}


def test_digits_stay_under_the_threshold_and_other_images_cross_it_within_a_window(
    lenet5_alone: ServiceProcess,
) -> None:
    digits, _ = held_out_drawings(WINDOW + 20)
    send(lenet5_alone, digits)
    calm = drift(lenet5_alone)
    send(lenet5_alone, out_of_distribution(WINDOW))
    stormy = drift(lenet5_alone)
    send(lenet5_alone, digits)
    back = drift(lenet5_alone)
    print(f"lenet5 drift over {WINDOW} answers: digits {calm}, then noise, photos and letters {stormy}, "
          f"then digits again {back}")  # fmt: skip
    assert set(calm) == {"confidence", "classes"}
    assert max(calm.values()) < THRESHOLD and stormy["confidence"] > THRESHOLD and max(back.values()) < THRESHOLD

    quality = httpx.get(f"{lenet5_alone.url}/models", timeout=10).json()["models"][0]["quality"]
    assert quality["baseline"].startswith("export: scikit-learn digits, test split")
    assert quality["window"] == quality["answers_in_window"] == WINDOW
    assert quality["drift"] == pytest.approx(back, abs=1e-4)


def test_a_version_without_a_baseline_learns_one_from_its_first_answers(
    model_store: ModelStore, tmp_path: Path
) -> None:
    version = model_store.latest("lenet5")
    assert version is not None
    store = tmp_path / "store"
    (store / "lenet5" / "1").mkdir(parents=True)
    for path in version.directory.parent.iterdir():  # labels and Triton's config beside the versions
        if path.is_file():
            (store / "lenet5" / path.name).write_bytes(path.read_bytes())
    for path in version.directory.iterdir():
        (store / "lenet5" / "1" / path.name).write_bytes(path.read_bytes())
    metadata = store / "lenet5" / "1" / "metadata.json"
    meta = json.loads(metadata.read_text())
    del meta["baseline"]  # as a store written before baselines
    metadata.write_text(json.dumps(meta))
    with running(store, tmp_path / "service.log", MODELS="lenet5", WORKERS="1", DRIFT_WINDOW="50",
                 BASELINE_REQUESTS="50") as service:  # fmt: skip
        digits, _ = held_out_drawings(150)
        send(service, digits[:50])
        quality = httpx.get(f"{service.url}/models", timeout=10).json()["models"][0]["quality"]
        assert quality["baseline"] == "learned from this version's first 50 answers" and quality["drift"] == {}
        send(service, digits[50:])
        quality = httpx.get(f"{service.url}/models", timeout=10).json()["models"][0]["quality"]
        assert quality["answers_in_window"] == 50 and max(quality["drift"].values()) < THRESHOLD
