"""``WORKERS=0``: how many workers serve, from the CPUs and the models' cost by their metadata, and where the
models run (on CUDA the cores parse and decode for one session host; no GPU here, so CUDA is decided by hand)."""

from __future__ import annotations

import pytest

from service.runtime import sizing
from service.settings import Settings
from service.store.layout import ModelStore


@pytest.mark.parametrize(
    ("models", "cpus", "on_cuda", "workers"),
    [
        ("lenet5", 2, False, 2),  # light: the event loop is the limit, one worker per CPU
        ("lenet5,resnet18", 16, False, 1),  # heavy on CPUs: one worker whose sessions take every core
        ("resnet18", 16, True, 4),  # heavy on CUDA: one worker per 4 CPUs feeds the GPU's session host
        ("resnet18", 6, True, 1),
        ("resnet18", 128, True, 8),  # at most 8 until more is measured
        ("lenet5", 16, True, 16),  # light on CUDA: one per CPU still
        ("resnet18", 1, True, 1),
    ],
)
def test_workers_follow_the_cpus_the_models_and_the_device(
    monkeypatch: pytest.MonkeyPatch, model_store: ModelStore, models: str, cpus: int, on_cuda: bool, workers: int
) -> None:
    monkeypatch.setattr(sizing, "cpu_count", lambda: cpus)
    monkeypatch.setattr(sizing, "wants_cuda", lambda settings: on_cuda)
    chosen, why = sizing.auto_workers(Settings(model_store=str(model_store.root), models=models))
    assert chosen == workers, why
    if on_cuda and cpus >= 2 and models == "resnet18":
        assert "models on CUDA" in why and ("session host" in why) == (workers > 1)


def test_a_model_not_in_the_store_counts_as_heavy_and_the_reason_says_it_is_unknown(
    monkeypatch: pytest.MonkeyPatch, model_store: ModelStore
) -> None:
    """A MODELS entry the store lacks (a typo, or one exported later) may be any network: one worker, as for a
    heavy one, and the log line names it as unknown rather than over the threshold."""
    monkeypatch.setattr(sizing, "cpu_count", lambda: 2)
    monkeypatch.setattr(sizing, "wants_cuda", lambda settings: False)
    chosen, why = sizing.auto_workers(Settings(model_store=str(model_store.root), models="lenet5,lenet6"))
    assert chosen == 1 and "lenet6 of unknown cost" in why and "GFLOPs" not in why, why
    chosen, why = sizing.auto_workers(Settings(model_store=str(model_store.root), models="resnet18,lenet6"))
    assert chosen == 1 and why.startswith("resnet18 over 0.1 GFLOPs per image; lenet6 of unknown cost"), why
