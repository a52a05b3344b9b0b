"""What every peer does per batch, identical to the service: Pillow decode, resize and crop per the
metadata (the service's own ``preprocess``), ONNX Runtime on the exported graph, the top 5."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from service.store.metadata import InputMeta
from service.store.preprocess import preprocess
from service.store.tensors import INPUT_NAME, OUTPUT_NAMES

MAX_PIXELS = 64_000_000  # the service's default MAX_IMAGE_PIXELS


class Classifier:
    """One stored version: ``classify(files)`` -> per file, the top 5 as ``[{"index", "score"}]``."""

    def __init__(self, version_dir: str | os.PathLike[str]) -> None:
        directory = Path(version_dir)
        meta = json.loads((directory / "metadata.json").read_text(encoding="utf-8"))
        self.input = InputMeta.model_validate(meta["input"])
        # ONNX Runtime's defaults (threads = cores), as each peer's documentation shows it
        self.session = ort.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])

    def classify(self, files: list[bytes], k: int = 5) -> list[list[dict[str, Any]]]:
        pixels = np.stack([preprocess(data, self.input, max_pixels=MAX_PIXELS) for data in files])
        (probabilities,) = self.session.run([OUTPUT_NAMES[1]], {INPUT_NAME: pixels})
        best = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
        return [
            [{"index": int(i), "score": float(row[i])} for i in top]
            for row, top in zip(probabilities, best, strict=True)
        ]
