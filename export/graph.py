"""The ONNX contract, and the proof that a graph keeps it.

Input ``images``: UINT8 ``[batch, H, W, C]`` (NHWC, RGB, or C = 1). The graph casts,
scales, normalises with the weights' mean and std and transposes to NCHW itself, so a
client only ever sends pixels. Outputs ``logits`` and ``probabilities`` (softmax), FP32
``[batch, num_classes]``. The batch axis is dynamic.
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

from .spec import InputSpec, ModelSpec

logger = logging.getLogger(__name__)

OPSET = 18
INPUT_NAME = "images"
OUTPUT_NAMES = ("logits", "probabilities")
TOLERANCE = 1e-4  # largest accepted |p_onnx - p_torch| on any probability


class VerificationError(RuntimeError):
    """The exported graph does not compute what the PyTorch model computes."""


class ClassifierGraph(nn.Module):
    """uint8 NHWC pixels -> (logits, probabilities), the contract's whole computation."""

    mean: Tensor
    std: Tensor

    def __init__(self, model: nn.Module, spec: InputSpec) -> None:
        super().__init__()
        self.model = model
        channels = spec.channels
        # Folding the /255 into mean and std: (x/255 - m)/s == (x - 255m)/(255s)
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, channels, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(spec.std).view(1, channels, 1, 1) * 255.0)

    def normalise(self, images: Tensor) -> Tensor:
        x = images.permute(0, 3, 1, 2).float()  # N x C x H x W
        return (x - self.mean) / self.std

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.model(self.normalise(images))
        return logits, torch.softmax(logits, dim=1)


def random_images(spec: InputSpec, batch: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(batch, spec.size, spec.size, spec.channels), dtype=np.uint8)


def export_onnx(graph: ClassifierGraph, spec: InputSpec, path: Path) -> None:
    """Trace ``graph`` to ``path`` with a dynamic batch axis and check it fully.

    Uses the TorchScript-based exporter: on these convolutional networks it writes one
    self-contained file ten times faster than the dynamo exporter, which splits the
    weights into external data.
    """
    example = torch.from_numpy(random_images(spec, batch=2))
    batch_axis = {0: "batch"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=DeprecationWarning)
        torch.onnx.export(
            graph.eval(),
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes={name: batch_axis for name in (INPUT_NAME, *OUTPUT_NAMES)},
            opset_version=OPSET,
            dynamo=False,
        )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


@dataclass(frozen=True)
class Verification:
    batch: int
    max_abs_diff_probabilities: float
    max_abs_diff_logits: float
    top1_agreement: float
    tolerance: float = TOLERANCE

    def to_dict(self) -> dict[str, float | int]:
        return dict(self.__dict__)


def verify(graph: ClassifierGraph, spec: InputSpec, path: Path, batch: int = 8, seed: int = 0) -> Verification:
    """Run the ONNX graph and the PyTorch model on the same random pixels and compare.

    Raises :class:`VerificationError` above :data:`TOLERANCE` or below 100% top-1 agreement.
    """
    images = random_images(spec, batch, seed)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_logits, onnx_probs = session.run(list(OUTPUT_NAMES), {INPUT_NAME: images})
    with torch.no_grad():
        torch_logits, torch_probs = (t.numpy() for t in graph.eval()(torch.from_numpy(images)))
    result = Verification(
        batch=batch,
        max_abs_diff_probabilities=float(np.abs(onnx_probs - torch_probs).max()),
        max_abs_diff_logits=float(np.abs(onnx_logits - torch_logits).max()),
        top1_agreement=float((onnx_logits.argmax(1) == torch_logits.argmax(1)).mean()),
    )
    if result.max_abs_diff_probabilities > TOLERANCE or result.top1_agreement < 1.0:
        raise VerificationError(
            f"{path}: ONNX Runtime differs from PyTorch (max |dp| = {result.max_abs_diff_probabilities:.2e}, "
            f"top-1 agreement {result.top1_agreement:.0%}; need <= {TOLERANCE:.0e} and 100%)"
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
