"""Session fixtures: a model store written by the real export stage, and the real service on it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from service.settings import Settings
from service.store.layout import ModelStore

from .helpers import ServiceProcess, running

# Exported once per test session: the trained LeNet-5 and one ImageNet network with
# seeded random weights (real weights cannot be downloaded here).
STORE_MODELS = {"lenet5": "trained", "resnet18": "random", "googlenet": "random"}


@pytest.fixture(scope="session")
def model_store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    from export.pipeline import ExportOptions, export_model

    store = ModelStore(tmp_path_factory.mktemp("model_store"))
    for name, weights in STORE_MODELS.items():
        export_model(name, store, ExportOptions(weights=weights, progress=False))  # type: ignore[arg-type]
    return store


@pytest.fixture(scope="session")
def service(model_store: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """The service on the session store; 'ghost' is requested but absent, so it is listed as failed."""
    log = tmp_path_factory.mktemp("logs") / "service.log"
    # a short drift window, so that the few images a test sends already measure drift (the dashboard's panels)
    with running(Path(model_store.root), log, MODELS="lenet5,resnet18,ghost", DEFAULT_MODEL="resnet18",
                 DRIFT_WINDOW="20") as process:  # fmt: skip
        yield process


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scikit-learn's 1,797 handwritten digits as an ImageFolder tree of 32 x 32 PNGs (``DIR/<digit>/<n>.png``),
    light strokes on a dark ground as the data set has them: a real labelled folder to fine-tune on."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digits-folder")
    digits = load_digits()
    for i, (pixels, digit) in enumerate(zip(digits.images, digits.target, strict=True)):
        (root / str(digit)).mkdir(exist_ok=True)
        image = Image.fromarray((pixels * 255 / 16).astype(np.uint8)).resize((32, 32), Image.Resampling.BILINEAR)
        image.save(root / str(digit) / f"{i:04d}.png")
    return root


@pytest.fixture
def no_settings_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings(...) reads the environment for what it is not given: a BATCH_SIZES or HTTP_PORT set there would
    refuse values a test gives it as allowed."""
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
