"""What a version's answers look like on images it should see: the baseline drift is measured against.

After a graph is written and verified, the held-out images (``calibration.held_out``: the
labelled digits' test split for LeNet-5, scikit-image's photos for the ImageNet networks) or
``--baseline-dir DIR`` (your own representative images, which is the right choice: the
photos are a dozen scenes, not your traffic) go through the service's own decoder and the
exported graph. The metadata records, as ``baseline``, the share of answers per confidence
bin and per top-1 class (``service.store.quality.distributions``), with the images' source
and hash. Where the images have labels, the abstain threshold too (``abstain``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from service.store.metadata import InputMeta
from service.store.quality import distributions
from service.store.tensors import INPUT_NAME, OUTPUT_NAMES

from . import abstain, calibration

logger = logging.getLogger(__name__)

MAX_BASELINE_IMAGES = 2000


def images_for(spec: InputMeta, directory: Path | None, seed: int = 0) -> calibration.ImageSet:
    if directory is not None:
        return calibration.from_directory(directory, spec, MAX_BASELINE_IMAGES, option="--baseline-dir")
    return calibration.held_out(spec, seed)


def probabilities_of(graph: Path, images: np.ndarray, batch: int = 32) -> np.ndarray:
    """``graph``'s probabilities for ``images`` (uint8, as served), in batches."""
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    rows = [
        session.run([OUTPUT_NAMES[1]], {INPUT_NAME: images[i : i + batch]})[0] for i in range(0, len(images), batch)
    ]
    return np.concatenate(rows).astype(np.float32)


def measure(graph: Path, spec: InputMeta, name: str, directory: Path | None = None, seed: int = 0,
            images: calibration.ImageSet | None = None) -> dict[str, Any]:  # fmt: skip
    """``{"baseline": ..., "abstain": ...}`` (abstain only where the images are labelled) for the metadata;
    on ``images`` where the caller has them already decoded."""
    images = images or images_for(spec, directory, seed)
    probabilities = probabilities_of(graph, images.images)
    out: dict[str, Any] = {"baseline": {**images.describe(), **distributions(probabilities)}}
    if images.labels is not None:
        top1 = probabilities.max(axis=1)
        correct = (probabilities.argmax(axis=1) == images.labels).astype(np.float64)
        out["abstain"] = {**abstain.threshold(top1, correct), "source": images.source}
        logger.info("%s: abstain below top-1 probability %.4f (%.1f%% of %d held-out images above it, %.2f%% right)",
                    name, out["abstain"]["threshold"], 100 * out["abstain"]["coverage"], len(images),
                    100 * (out["abstain"]["accuracy_above"] or 0))  # fmt: skip
    logger.info("%s: baseline of answers from %s", name, images.source)
    return out
