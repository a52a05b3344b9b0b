"""The Classifier in-process: what every front end's answers are made of (the ranking, top_k, the verdict)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from service.errors import InvalidInput
from service.runtime.classifier import Classified

from ..pictures import held_out_drawings, out_of_distribution
from .harness import Served


def classify(served: Served, files: list[bytes], k: int = 5, min_confidence: float | None = None) -> Classified:
    async def run() -> Classified:
        return await served.classifier.classify("lenet5", None, files, k, min_confidence)

    return asyncio.run(run())


def top1(classified: Classified) -> np.ndarray:
    return np.array([answer.predictions[0]["score"] for answer in classified.answers])


def test_real_digits_are_ranked_best_first_and_mostly_right(served_lenet5: Served) -> None:
    files, labels = held_out_drawings(30)
    answers = classify(served_lenet5, files, k=3).answers
    assert len(answers) == 30
    for answer in answers:
        scores = [p["score"] for p in answer.predictions]
        assert len(scores) == 3 and scores == sorted(scores, reverse=True) and 0 < scores[-1] <= scores[0] <= 1
        assert [p["label"] for p in answer.predictions] == [str(p["index"]) for p in answer.predictions]
    right = np.array([int(answer.predictions[0]["label"]) for answer in answers]) == labels
    assert right.mean() >= 0.9, right


def test_top_k_is_clamped_to_the_class_count_and_agrees_with_a_smaller_k(served_lenet5: Served) -> None:
    files, _ = held_out_drawings(4)
    every, one = classify(served_lenet5, files, k=50), classify(served_lenet5, files, k=1)
    for full, best in zip(every.answers, one.answers, strict=True):
        assert sorted(p["index"] for p in full.predictions) == list(range(10))  # LeNet-5's ten classes, no more
        assert sum(p["score"] for p in full.predictions) == pytest.approx(1.0, rel=1e-5)
        assert best.predictions == full.predictions[:1]


def test_confident_is_judged_by_the_request_threshold_else_the_models(served_lenet5: Served) -> None:
    files, _ = held_out_drawings(20)
    entry = served_lenet5.repository.get("lenet5", None)
    assert entry.model is not None
    meta = entry.model.metadata
    assert meta.abstain_threshold is not None and meta.typicality_threshold is not None  # the export derived both

    default = classify(served_lenet5, files)
    typical = np.array([answer.verdict.typical for answer in default.answers])
    confident = np.array([answer.verdict.confident for answer in default.answers])
    assert default.min_confidence == meta.abstain_threshold
    assert typical.all()  # held-out digits are like the training ones
    assert np.array_equal(confident, top1(default) >= meta.abstain_threshold) and confident.any()

    anything = classify(served_lenet5, files, min_confidence=0.0)
    assert anything.min_confidence == 0.0 and all(answer.verdict.confident for answer in anything.answers)
    certain = classify(served_lenet5, files, min_confidence=1.0)
    sure = np.array([answer.verdict.confident for answer in certain.answers])
    assert certain.min_confidence == 1.0 and np.array_equal(sure, top1(certain) >= 1.0) and not sure.all()


def test_an_atypical_image_is_not_confident_however_low_the_threshold(served_lenet5: Served) -> None:
    noise = out_of_distribution(1)  # uniform noise
    (answer,) = classify(served_lenet5, noise, min_confidence=0.0).answers
    assert answer.verdict.typical is False and answer.verdict.confident is False


def test_bytes_that_are_no_image_are_the_clients_error(served_lenet5: Served) -> None:
    files, _ = held_out_drawings(1)
    with pytest.raises(InvalidInput, match="decode"):
        classify(served_lenet5, [files[0], b"\x89PNG\r\n\x1a\n garbage"])
