"""Your own classes, from folder to serving: LeNet-5 fine-tuned by the real CLI on a folder of scikit-learn's
digits (10 classes, 1,797 PNGs), with its INT8 variant from the same command, served in poll mode: the recorded
held-out accuracy is what /classify scores on the held-out files, and a second fine-tune takes over under load
with no request lost."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from export.cli import main as export_main
from service.store.layout import ModelStore

from ...helpers import ROOT, ServiceProcess, models, running, wait_until
from ..lifecycle_load import SteadyLoad, percentiles

pytestmark = pytest.mark.integration

FLOOR = 0.9  # the held-out top-1 this fine-tune must reach (it measures 95-97% here)
TUNE = ["--augment", "crop", "--no-progress"]  # no mirror images for digits


@pytest.fixture(scope="module")
def tuned(digits_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    store = tmp_path_factory.mktemp("tuned") / "store"
    command = ["lenet5", "--finetune", str(digits_folder), "--as", "digits", "--epochs", "12", *TUNE, "--min-accuracy",
               str(FLOOR), "--precision", "int8", "--recipe", "u8s8", "--out", str(store)]  # fmt: skip
    assert export_main(command) == 0
    return ModelStore(store)


@pytest.fixture(scope="module")
def tuned_service(tuned: ModelStore) -> Iterator[ServiceProcess]:
    env = {"MODEL_CONTROL": "poll", "POLL_INTERVAL_S": "1", "MODELS": ""}
    with running(tuned.root, tuned.root.parent / "service.log", **env) as service:
        yield service


def served_top1(service: ServiceProcess, model: str, folder: Path, files: list[str]) -> float:
    right = 0
    with httpx.Client(base_url=service.url, timeout=30) as client:
        for name in files:
            body, params = (folder / name).read_bytes(), {"model": model, "top_k": 1}
            response = client.post("/classify", params=params, content=body, headers={"content-type": "image/png"})
            assert response.status_code == 200, response.text
            right += response.json()["results"][0]["predictions"][0]["label"] == Path(name).parts[0]
    return right / len(files)


def test_the_recorded_accuracy_is_what_the_service_scores_on_the_held_out_files(
    tuned: ModelStore, tuned_service: ServiceProcess, digits_folder: Path
) -> None:
    for model in ("digits", "digits_int8"):
        version = tuned.latest(model)
        assert version is not None
        recorded = version.read_metadata()["evaluation"]
        split = json.loads((tuned.latest("digits").directory / "split.json").read_text())  # type: ignore[union-attr]
        assert recorded["images"] == len(split["held_out"]) >= 300  # a fifth of 1,797, by class
        assert not set(split["held_out"]) & (set(split["train"]) | set(split["select"]))
        served = served_top1(tuned_service, model, digits_folder, split["held_out"])
        print(f"{model}: held-out top-1 recorded {recorded['top1']:.4f}, served {served:.4f}")
        assert served == pytest.approx(recorded["top1"], abs=1e-4) and served >= FLOOR


def test_models_shows_the_accuracy_and_per_class_on_demand(tuned_service: ServiceProcess, tuned: ModelStore) -> None:
    listed = models(tuned_service)
    digits = listed["digits"]
    assert digits["num_classes"] == 10 and digits["architecture"]["built_on"] == "lenet5"
    assert digits["evaluation"]["top1"] >= FLOOR and digits["evaluation"]["passed"] is True
    assert digits["evaluation"]["min_top1"] == FLOOR and "per_class" not in digits["evaluation"]
    assert digits["weights"]["kind"] == "finetuned" and digits["weights"]["details"]["training"]["epoch_kept"] >= 1
    detailed = httpx.get(f"{tuned_service.url}/models", params={"per_class": "true"}, timeout=10).json()["models"]
    found: dict[str, Any] = next(m for m in detailed if m["name"] == "digits")["evaluation"]
    assert set(found["per_class"]) == {str(d) for d in range(10)}
    confusion = found["confusion"]
    assert sum(map(sum, confusion)) == found["images"]
    assert sum(confusion[i][i] for i in range(10)) / found["images"] == pytest.approx(found["top1"], abs=1e-4)
    # the INT8 variant: calibrated on the training split, gated with labels on the held-out one
    variant = listed["digits_int8"]
    assert variant["accuracy"]["accuracy_drop"] <= 0.5 and variant["accuracy"]["held_out"]["count"] == found["images"]
    stored = tuned.latest("digits_int8")
    assert stored is not None and stored.read_metadata()["calibration"]["source"].startswith("the training split of")
    assert variant["evaluation"]["images"] == found["images"]


def test_the_page_shows_its_accuracy_and_per_class_on_demand(tuned_service: ServiceProcess) -> None:
    from playwright.sync_api import sync_playwright

    from ..browser import CHROMIUM, open_tab

    listed = httpx.get(f"{tuned_service.url}/models", params={"per_class": "true"}, timeout=10).json()["models"]
    expected = next(m for m in listed if m["name"] == "digits")["evaluation"]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        tab = open_tab(browser, tuned_service.url)
        page = tab.page
        page.wait_for_selector("#model-select:not([disabled])")
        page.select_option("#model-select", "digits")
        card = page.inner_text("#model-card")
        assert "LeNet, built on lenet5" in card
        assert f"top-1 {100 * expected['top1']:.1f}%" in card and f"on {expected['images']} held-out images" in card
        page.click("#model-card .per-class button")
        page.wait_for_selector("#model-card .per-class li")
        shown = {item.get_attribute("data-label"): item.inner_text() for item in page.query_selector_all(
            "#model-card .per-class li")}  # fmt: skip
        assert set(shown) == {str(d) for d in range(10)}
        for label, figures in expected["per_class"].items():
            assert shown[label] == f"{label}: {100 * figures['top1']:.1f}% of {figures['images']}"
        assert not tab.console_errors and not tab.outside_origin()
        browser.close()


def test_a_second_fine_tune_takes_over_under_load_and_no_request_fails(
    tuned: ModelStore, tuned_service: ServiceProcess, digits_folder: Path
) -> None:
    with SteadyLoad(tuned_service, model="digits") as load:
        time.sleep(2)
        command = [sys.executable, "-m", "export", "lenet5", "--finetune", str(digits_folder), "--as", "digits",
                   "--epochs", "4", "--seed", "1", *TUNE, "--out", str(tuned.root)]  # fmt: skip
        export = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert export.returncode == 0, export.stderr[-2000:]
        wait_until(lambda: load.first("2") is not None, 60, "an answer from version 2")
        wait_until(lambda: models(tuned_service)["digits"]["served"][-1]["version"] == 2
                   and len(models(tuned_service)["digits"]["served"]) == 1, 60, "version 1 released")  # fmt: skip
        time.sleep(1)
    failed = [a for a in load.answers if a.error]
    print(f"\nthrough the second fine-tune: {percentiles(load.answers)}")
    assert not failed, failed[:5]
    assert {a.version for a in load.answers} == {"1", "2"}
