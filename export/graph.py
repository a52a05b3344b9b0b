"""The ONNX contract, and the proof that a graph keeps it.

Input ``images``: UINT8 ``[batch, H, W, C]`` (NHWC, RGB, or C = 1). The graph casts,
scales, normalises with the weights' mean and std and transposes to NCHW itself, so a
client only ever sends pixels. Outputs ``logits`` and ``probabilities`` (softmax), FP32
``[batch, num_classes]``; where the export fitted a typicality check (``export/typicality.py``),
a third, ``distance`` (FP32 ``[batch]``). The batch axis is dynamic. The names are
``service.store.tensors``': one definition for the export that writes them and the service that
runs the graph by them.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import Tensor, nn

from service.store.tensors import DISTANCE_NAME, INPUT_NAME, OUTPUT_NAMES

from .spec import InputSpec, ModelSpec
from .typicality import DistanceHead

logger = logging.getLogger(__name__)

OPSET = 18
TOLERANCE = 1e-4  # largest accepted |p_onnx - p_torch| on any probability
DISTANCE_TOLERANCE = 1e-3  # largest accepted |d_onnx - d_torch| / d_torch


class VerificationError(RuntimeError):
    """The exported graph does not compute what the PyTorch model computes."""


class ClassifierGraph(nn.Module):
    """uint8 NHWC pixels -> (logits, probabilities[, distance]), the contract's whole computation.

    With a ``typicality`` head, the features at ``layer`` (caught by a forward hook, so the
    network's own code is untouched) also go through it, giving each image's ``distance``.
    """

    mean: Tensor
    std: Tensor

    def __init__(self, model: nn.Module, spec: InputSpec, typicality: tuple[str, DistanceHead] | None = None) -> None:
        super().__init__()
        self.model = model
        channels = spec.channels
        # Folding the /255 into mean and std: (x/255 - m)/s == (x - 255m)/(255s)
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, channels, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(spec.std).view(1, channels, 1, 1) * 255.0)
        self.typicality: DistanceHead | None = None
        self._features: list[Tensor] = []
        if typicality is not None:
            layer, self.typicality = typicality
            model.get_submodule(layer).register_forward_hook(lambda _m, _i, out: self._features.append(out))

    @property
    def output_names(self) -> tuple[str, ...]:
        return (*OUTPUT_NAMES, DISTANCE_NAME) if self.typicality is not None else OUTPUT_NAMES

    def normalise(self, images: Tensor) -> Tensor:
        x = images.permute(0, 3, 1, 2).float()  # N x C x H x W
        return (x - self.mean) / self.std

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        self._features.clear()
        logits = self.model(self.normalise(images))
        if self.typicality is None:
            return logits, torch.softmax(logits, dim=1)
        return logits, torch.softmax(logits, dim=1), self.typicality(self._features.pop())


def random_images(spec: InputSpec, batch: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(batch, spec.size, spec.size, spec.channels), dtype=np.uint8)


def trace(module: nn.Module, example: tuple[Tensor, ...], path: Path, inputs: list[str], outputs: list[str]) -> None:
    """Trace ``module`` to ``path`` with a dynamic batch axis on every input and output, and check it fully.

    Uses the TorchScript-based exporter: on these convolutional networks it writes one
    self-contained file ten times faster than the dynamo exporter, which splits the
    weights into external data.
    """
    batch_axis = {0: "batch"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=DeprecationWarning)
        torch.onnx.export(
            module.eval(),
            example,
            str(path),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes={name: batch_axis for name in (*inputs, *outputs)},
            opset_version=OPSET,
            dynamo=False,
        )
    # from the file: C++ reads it, where a loaded model is serialised again (5.4 s against 0.7 s for VGG-16)
    onnx.checker.check_model(str(path), full_check=True)


def export_onnx(graph: ClassifierGraph, spec: InputSpec, path: Path) -> None:
    """The classifier graph: uint8 images in, its outputs (``graph.output_names``) out."""
    trace(graph, (torch.from_numpy(random_images(spec, batch=2)),), path, [INPUT_NAME], list(graph.output_names))


@dataclass(frozen=True)
class Verification:
    batch: int
    max_abs_diff_probabilities: float
    max_abs_diff_logits: float
    top1_agreement: float
    tolerance: float = TOLERANCE
    max_rel_diff_distance: float | None = None  # where the graph has a typicality check

    def to_dict(self) -> dict[str, float | int]:
        return {key: value for key, value in self.__dict__.items() if value is not None}


def verify(graph: ClassifierGraph, spec: InputSpec, path: Path, batch: int = 8, seed: int = 0) -> Verification:
    """Run the ONNX graph and the PyTorch model on the same random pixels and compare.

    Raises :class:`VerificationError` above :data:`TOLERANCE` (:data:`DISTANCE_TOLERANCE` for
    the distance, relative) or below 100% top-1 agreement.
    """
    images = random_images(spec, batch, seed)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ours = session.run(list(graph.output_names), {INPUT_NAME: images})
    with torch.no_grad():
        theirs = [t.numpy() for t in graph.eval()(torch.from_numpy(images))]
    (onnx_logits, onnx_probs), (torch_logits, torch_probs) = ours[:2], theirs[:2]
    result = Verification(
        batch=batch,
        max_abs_diff_probabilities=float(np.abs(onnx_probs - torch_probs).max()),
        max_abs_diff_logits=float(np.abs(onnx_logits - torch_logits).max()),
        top1_agreement=float((onnx_logits.argmax(1) == torch_logits.argmax(1)).mean()),
        max_rel_diff_distance=(
            float((np.abs(ours[2] - theirs[2]) / np.maximum(np.abs(theirs[2]), 1e-6)).max()) if len(ours) > 2 else None
        ),
    )
    distance_off = (result.max_rel_diff_distance or 0.0) > DISTANCE_TOLERANCE
    if result.max_abs_diff_probabilities > TOLERANCE or result.top1_agreement < 1.0 or distance_off:
        raise VerificationError(
            f"{path}: ONNX Runtime differs from PyTorch (max |dp| = {result.max_abs_diff_probabilities:.2e}, "
            f"top-1 agreement {result.top1_agreement:.0%}"
            + (f", max relative distance difference {result.max_rel_diff_distance:.2e}" if distance_off else "")
            + f"; need <= {TOLERANCE:.0e} and 100%"
            + (f" and <= {DISTANCE_TOLERANCE:.0e}" if distance_off else "")
            + ")"
        )
    return result


def count_flops(spec: ModelSpec) -> int:
    """FLOPs of one image's forward pass (a multiply-add counts as 2), on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = spec.build().eval()
        x = torch.empty(1, spec.input.channels, spec.input.size, spec.input.size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return int(counter.get_total_flops())
