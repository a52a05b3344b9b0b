"""Is this image like the ones the model learnt from? A per-image check the graph computes itself.

A classifier's softmax cannot say "none of these": uniform noise drawn through the trained
LeNet-5 gets a top-1 probability over its abstain threshold about half the time. What
does tell noise, photos and letters from digits is where an image lands among the
network's own features: the **Mahalanobis distance** (Lee et al., "A Simple Unified
Framework for Detecting Out-of-Distribution Samples and Adversarial Attacks", NeurIPS
2018) to the nearest class of Gaussians fitted at export time to the training images'
features at one layer (one mean per class, one shared covariance, shrunk towards its
mean variance so that it inverts).

The export fits it where it has the model's training images (LeNet-5 trained here, on the
augmented views it trained on) and writes it **into the graph** as a third output,
``distance`` (FP32 ``[batch]``): ``min_c ||(f - mu_c) W||^2`` with ``W W^T`` the inverse
covariance. The threshold is the ``QUANTILE`` of the held-out split's distances (views
augmented the same way): 1% of images like the held-out ones are called atypical. The
graph's distance is verified against PyTorch like its probabilities.

The layer is the model's ``typicality_layer`` (LeNet-5: S4, the last pooling before C5),
chosen by measurement on the trained LeNet-5 with the same fit: C5 flagged 27% of uniform
noise, 45% of photo patches and 33% of printed letters, F6 93%, 64% and 33%, S4 all three
(``tests/export/test_typicality.py`` prints what the exported graph flags, two more kinds
of images included).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from service.store.tensors import DISTANCE_NAME, INPUT_NAME

logger = logging.getLogger(__name__)

QUANTILE = 0.99
SHRINKAGE = 0.01  # of the covariance's mean variance, added to its diagonal
METHOD = "Mahalanobis distance to the nearest class mean, shared covariance (Lee et al., NeurIPS 2018)"


class DistanceHead(nn.Module):
    """Features ``[N, ...]`` -> ``min_c ||f W - mu_c W||^2`` ``[N]``, in float32.

    Expanded as ``||fW||^2 - 2 fW.(mu_c W) + ||mu_c W||^2``: one ``D x D`` product per image
    instead of one per class (LeNet-5: 0.16 M multiply-adds, not 1.6 M, against its own
    0.4 M). The difference of large terms costs about 1e-6 of the distance in float32,
    which is why these nodes stay in float in an INT8 variant (``export/precision.py``).
    """

    whitening: Tensor
    centres: Tensor
    centre_norms: Tensor

    def __init__(self, means: np.ndarray, whitening: np.ndarray) -> None:
        super().__init__()
        centres = means @ whitening  # C x D, in float64 before the cast
        self.register_buffer("whitening", torch.from_numpy(whitening.astype(np.float32)))
        self.register_buffer("centres", torch.from_numpy(centres.astype(np.float32)))
        self.register_buffer("centre_norms", torch.from_numpy((centres**2).sum(1).astype(np.float32)))

    def forward(self, features: Tensor) -> Tensor:
        z = torch.matmul(torch.flatten(features, 1), self.whitening)  # N x D
        squared = z.square().sum(1, keepdim=True) - 2 * torch.matmul(z, self.centres.T) + self.centre_norms
        return squared.amin(1).clamp_min(0.0)


@dataclass(frozen=True)
class Typicality:
    """Fitted class Gaussians at ``layer``, and the distance above which an image is atypical."""

    layer: str
    means: np.ndarray  # C x D
    whitening: np.ndarray  # D x D
    threshold: float
    fitted_on: int
    held_out: int
    source: str

    def head(self) -> DistanceHead:
        return DistanceHead(self.means, self.whitening)

    def to_dict(self) -> dict[str, Any]:
        return {"method": METHOD, "layer": self.layer, "dimensions": int(self.means.shape[1]),
                "threshold": round(self.threshold, 4), "quantile": QUANTILE, "shrinkage": SHRINKAGE,
                "fitted_on": self.fitted_on, "held_out": self.held_out, "source": self.source}  # fmt: skip


def layer_features(model: nn.Module, layer: str, inputs: Tensor, batch: int = 512) -> np.ndarray:
    """``model``'s output at ``layer`` for normalised ``inputs``, flattened per image."""
    captured: list[Tensor] = []
    hook = model.get_submodule(layer).register_forward_hook(lambda _m, _i, out: captured.append(out.flatten(1)))
    try:
        model.eval()
        with torch.no_grad():
            for i in range(0, len(inputs), batch):
                model(inputs[i : i + batch])
    finally:
        hook.remove()
    return torch.cat(captured).double().numpy()


def fit(features: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Class means and the whitening ``W`` (``W W^T`` = the inverse of the shrunk shared covariance)."""
    missing = sorted(set(range(num_classes)) - set(labels.tolist()))
    if missing:
        raise ValueError(f"no training images of classes {missing} to fit the typicality check on")
    means = np.stack([features[labels == c].mean(0) for c in range(num_classes)])
    centred = features - means[labels]
    covariance = centred.T @ centred / len(features)
    covariance += SHRINKAGE * np.trace(covariance) / len(covariance) * np.eye(len(covariance))
    whitening = np.linalg.cholesky(np.linalg.inv(covariance))
    return means, whitening


def threshold_of(held_out_distances: np.ndarray) -> float:
    return float(np.quantile(held_out_distances, QUANTILE))


def measure(
    model: nn.Module,
    normalise: Callable[[Tensor], Tensor],
    layer: str,
    train: tuple[np.ndarray, np.ndarray],
    held_out: np.ndarray,
    num_classes: int,
    source: str,
) -> Typicality:
    """Fit on ``train`` (uint8 NHWC images as served, labels); the threshold from ``held_out`` images."""
    images, labels = train

    def features(pixels: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return layer_features(model, layer, normalise(torch.from_numpy(pixels)))

    means, whitening = fit(features(images), labels, num_classes)
    with torch.no_grad():
        held = DistanceHead(means, whitening)(torch.from_numpy(features(held_out).astype(np.float32))).numpy()
    result = Typicality(layer, means, whitening, threshold_of(held), len(labels), len(held_out), source)
    logger.info("typicality at %s: distance threshold %.1f (%.0f%% of %d held-out views below it)",
                layer, result.threshold, 100 * QUANTILE, len(held_out))  # fmt: skip
    return result


def graph_distances(graph: Path, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """The ``distance`` output of an exported graph (an FP32 export or a variant of it) for ``images``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    rows = [session.run([DISTANCE_NAME], {INPUT_NAME: images[i : i + batch]})[0] for i in range(0, len(images), batch)]
    return np.concatenate(rows)
