"""The trained LeNet-5, served, reads digits drawn as dark ink on white paper."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from ...helpers import ServiceProcess
from ..pictures import drawn

pytestmark = pytest.mark.integration


def test_served_lenet5_reads_drawn_digits(service: ServiceProcess) -> None:
    digits = load_digits()
    # the export's held-out split: these drawings were never trained on
    _, images, _, labels = train_test_split(
        digits.images, digits.target, test_size=0.2, random_state=0, stratify=digits.target
    )
    predicted: list[int] = []
    for start in range(0, len(images), 60):
        files = [("image", (f"{i}.png", drawn(img), "image/png")) for i, img in enumerate(images[start : start + 60])]
        response = httpx.post(
            f"{service.url}/classify", params={"model": "lenet5", "top_k": 1}, files=files, timeout=60
        )
        assert response.status_code == 200, response.text
        predicted += [int(r["predictions"][0]["label"]) for r in response.json()["results"]]
    accuracy = float(np.mean(np.array(predicted) == labels))
    assert accuracy >= 0.95, f"accuracy {accuracy:.3f}"
