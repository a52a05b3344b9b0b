"""The abstain threshold: from held-out answers, the top-1 probability above which the model is right often enough."""

from __future__ import annotations

import json

import numpy as np
import pytest

from export.abstain import threshold
from service.store.layout import ModelStore


def test_the_threshold_keeps_the_longest_run_of_surest_answers_that_reaches_the_target() -> None:
    top1 = np.array([0.6, 0.99, 0.8, 0.95, 0.9, 0.3])
    correct = np.array([1, 1, 0, 1, 1, 0], dtype=float)
    found = threshold(top1, correct, target=0.99)
    # sorted: 0.99 R, 0.95 R, 0.9 R, 0.8 W, 0.6 R, 0.3 W -> the three surest are all right
    assert found["threshold"] == 0.9 and found["coverage"] == 0.5 and found["accuracy_above"] == 1.0
    assert found["accuracy"] == pytest.approx(4 / 6, abs=1e-4) and found["held_out"] == 6
    # a lower target reaches further: 0.99..0.6 holds 4 of 5 right (0.8)
    assert threshold(top1, correct, target=0.8)["threshold"] == 0.6


def test_where_not_even_the_surest_answer_is_right_nothing_is_trusted() -> None:
    found = threshold(np.array([0.9, 0.5]), np.array([0.0, 1.0]), target=0.99)
    assert found["threshold"] == 1.0 and found["coverage"] == 0.0 and found["accuracy_above"] is None
    with pytest.raises(ValueError, match="no held-out images"):
        threshold(np.array([]), np.array([]))


def test_trained_lenet5_records_its_threshold_and_random_weights_none(model_store: ModelStore) -> None:
    def metadata(name: str) -> dict:
        version = model_store.latest(name)
        assert version is not None
        return json.loads((version.directory / "metadata.json").read_text())

    lenet5 = metadata("lenet5")
    abstain, baseline = lenet5["abstain"], lenet5["baseline"]
    assert 0.0 < abstain["threshold"] < 1.0 and abstain["accuracy_above"] >= abstain["target_accuracy"] == 0.99
    assert abstain["held_out"] == 360 and abstain["coverage"] > 0.9 and "test split" in abstain["source"]
    # the baseline: the same held-out digits' answers, per confidence bin and per class
    assert baseline["count"] == 360 and baseline["labelled"] and baseline["source"] == abstain["source"]
    assert len(baseline["classes"]) == 10 and sum(baseline["classes"]) == pytest.approx(1, abs=1e-4)
    assert min(baseline["classes"]) > 0.08  # a stratified split: every digit about a tenth
    assert sum(baseline["confidence"][-3:]) > 0.8  # a trained classifier is mostly sure of them
    resnet18 = metadata("resnet18")
    assert "abstain" not in resnet18  # the photos have no labels
    assert (
        resnet18["baseline"]["source"].startswith("scikit-image photos")
        and len(resnet18["baseline"]["classes"]) == 1000
    )
