"""Grad-CAM graphs: where the network looked, computed by ONNX Runtime, proven against PyTorch's autograd.

Grad-CAM (Selvaraju et al., ICCV 2017) weighs a convolutional layer's feature maps ``A`` by
the spatial mean of the class score's gradient with respect to them, and keeps the positive
part: ``ReLU(sum_k alpha_k A_k)``, ``alpha_k = mean_ij dS_c / dA_kij``. ONNX Runtime cannot
differentiate, so each family's head has its backward pass written here as forward
operations, which trace into a plain inference graph (``explain.onnx``):

- **ResNet, GoogLeNet** (global average pooling, one linear layer): ``dS_c/dA_kij = W_ck / hw``,
  so the map is CAM (Zhou et al., CVPR 2016) and falls out of the forward pass. Layer: the
  last block's output (``layer4``, ``inception5b``), 7 x 7 at 224 pixels.
- **AlexNet, VGG** (a three-layer perceptron on the last pooling's output): the gradient goes
  back through the linear layers' weights and the ReLUs' masks. Layer: the feature
  extractor's output (after its last max-pooling, 6 x 6 and 7 x 7), so no pooling indices
  are needed; the adaptive average pooling in between is the identity at 224 pixels.
- **LeNet-5** (C5, F6 and the output, with tanh): back through the tanh derivatives, the
  weights and S4's 2 x 2 average pooling, to C3's output (10 x 10).

Inputs: ``images`` (uint8 NHWC, as the classifier's) and ``classes`` (int64 ``[N]``; a
negative entry means the image's top-1). Outputs: ``probabilities`` and ``gradcam``
(``[N, h, w]`` in [0, 1], each map divided by its largest value; all zeros where no
position has a positive weight), before any upsampling. LeNet-5's graph also outputs what
each layer sees (``FEATURE_MAPS``: C1, S2, C3 and S4's activations), for the page's layer
view: what every course on these networks draws, from the real served model. :func:`verify` compares it with
:func:`autograd_gradcam` on the same pixels; the export fails above ``TOLERANCE``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor, nn

from service.store.tensors import CLASSES_NAME, EXPLANATION_OUTPUT_NAMES, INPUT_NAME

from .graph import ClassifierGraph, random_images, trace
from .spec import InputSpec, ModelSpec
from .weights import sha256_file

FILE = "explain.onnx"
TOLERANCE = 1e-3  # largest accepted difference of a normalised map's value from autograd's
METHOD = "Grad-CAM (Selvaraju et al., ICCV 2017): the backward pass of the head written as forward operations"

# family -> (the layer the map is taken at, how its head's gradient is written)
LAYERS: dict[str, tuple[str, str]] = {
    "LeNet": ("features.4", "lenet"),  # C3, after its tanh
    "AlexNet": ("features", "mlp"),
    "VGG": ("features", "mlp"),
    "GoogLeNet": ("inception5b", "pooled-linear"),
    "ResNet": ("layer4", "pooled-linear"),
}


# family -> the method `/explain` uses when a request names none, where it is not Grad-CAM, and why.
# LeNet-5's tanh units give the dark ground (-1 after normalisation) activations as large as a
# stroke's, and C3's receptive field is 14 of its 32 pixels: on drawn digits its Grad-CAM puts
# 54% of its mass on ink that covers 54% of C3's positions (Grad-CAM at C1 and S2: 40% on 33%),
# where occlusion puts 92% on 30%, so the map a reader gets by default is occlusion's
# (`pytest -s tests/service/e2e/test_explain.py -k default`). Grad-CAM stays one `method=gradcam` away.
DEFAULT_METHOD: dict[str, tuple[str, str]] = {
    "LeNet": (
        "occlusion",
        "Grad-CAM at C3 of this tanh network does not single out the strokes (54% of its mass on ink that covers "
        "54% of the positions, on drawn digits); occlusion does (92% on 30%)",
    ),
}


# family -> {output name: module}: the feature maps its explanation graph also outputs
FEATURE_MAPS: dict[str, dict[str, str]] = {
    "LeNet": {"C1": "features.1", "S2": "features.2", "C3": "features.4", "S4": "features.5"},
}


class ExplanationError(RuntimeError):
    """The explanation graph does not compute PyTorch's Grad-CAM."""


def _normalised(cam: Tensor) -> Tensor:
    largest = cam.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
    return cam / largest


class GradCamGraph(nn.Module):
    """uint8 NHWC pixels and class indices -> (probabilities, normalised Grad-CAM maps)."""

    def __init__(self, model: nn.Module, spec: InputSpec, family: str) -> None:
        super().__init__()
        if family not in LAYERS:
            raise ValueError(f"no Grad-CAM head for the {family} family; known: {', '.join(LAYERS)}")
        self.layer, self.head = LAYERS[family]
        self.classifier = ClassifierGraph(model, spec)
        self.model = model
        self._maps: list[Tensor] = []
        model.get_submodule(self.layer).register_forward_hook(lambda _m, _i, out: self._maps.append(out))
        self.feature_maps = FEATURE_MAPS.get(family, {})
        self._seen: dict[str, Tensor] = {}
        for name, module in self.feature_maps.items():
            model.get_submodule(module).register_forward_hook(self._keeper(name))

    def _keeper(self, name: str) -> Any:
        def keep(_m: nn.Module, _i: Any, out: Tensor) -> None:
            self._seen[name] = out

        return keep

    @property
    def output_names(self) -> tuple[str, ...]:
        return (*EXPLANATION_OUTPUT_NAMES, *self.feature_maps)

    def forward(self, images: Tensor, classes: Tensor) -> tuple[Tensor, ...]:
        self._maps.clear()
        logits, probabilities = self.classifier(images)
        chosen = torch.where(classes < 0, logits.argmax(1), classes)
        maps = self._maps.pop()
        weights = getattr(self, f"_weights_{self.head.replace('-', '_')}")(maps, chosen)  # N x C
        cam = torch.relu((weights[:, :, None, None] * maps).sum(1))
        return probabilities, _normalised(cam), *(self._seen[name] for name in self.feature_maps)

    def _part(self, path: str) -> Any:
        return self.model.get_submodule(path)

    def _weights_pooled_linear(self, maps: Tensor, chosen: Tensor) -> Tensor:
        return self._part("fc").weight[chosen] / (maps.shape[2] * maps.shape[3])

    def _weights_mlp(self, maps: Tensor, chosen: Tensor) -> Tensor:
        pooled = self._part("avgpool")(maps)
        if pooled.shape != maps.shape:
            raise ValueError(f"the adaptive pooling changes {tuple(maps.shape)} to {tuple(pooled.shape)}: Grad-CAM "
                             "here needs the input size the weights were made for")  # fmt: skip
        first, second, last = (m for m in self._part("classifier") if isinstance(m, nn.Linear))
        hidden1 = first(torch.flatten(maps, 1))
        hidden2 = second(torch.relu(hidden1))
        grad = last.weight[chosen] * (hidden2 > 0)  # through the second ReLU
        grad = (grad @ second.weight) * (hidden1 > 0)  # the second linear layer, the first ReLU
        grad = (grad @ first.weight).view_as(maps)  # the first linear layer, back on the maps
        return grad.mean((2, 3))

    def _weights_lenet(self, maps: Tensor, chosen: Tensor) -> Tensor:
        s4_pool, c5_conv = self._part("features.5"), self._part("features.6")
        f6, out = self._part("classifier.0"), self._part("classifier.2")
        s4 = s4_pool(maps)  # N x 16 x 5 x 5
        c5 = torch.tanh(c5_conv(s4)).flatten(1)  # N x 120
        f6_out = torch.tanh(f6(c5))  # N x 84
        grad = out.weight[chosen] * (1 - f6_out**2)  # the output layer, F6's tanh
        grad = (grad @ f6.weight) * (1 - c5**2)  # F6, C5's tanh
        grad = (grad @ c5_conv.weight.flatten(1)).view_as(s4)  # C5 (a linear map of S4's 16 x 5 x 5)
        # S4 averages 2 x 2: each C3 position gets a quarter of its window's gradient; its spatial mean is
        # a quarter of S4's spatial mean
        return grad.mean((2, 3)) / 4


def autograd_gradcam(model: nn.Module, spec: InputSpec, layer: str, images: np.ndarray,
                     classes: np.ndarray) -> np.ndarray:  # fmt: skip
    """Grad-CAM the usual way: PyTorch's autograd at ``layer`` (negative classes: the top-1), normalised."""
    graph = ClassifierGraph(model, spec).eval()
    kept: list[Tensor] = []

    def keep(_m: nn.Module, _i: Any, out: Tensor) -> None:
        out.retain_grad()
        kept.append(out)

    hook = model.get_submodule(layer).register_forward_hook(keep)
    try:
        logits = graph.model(graph.normalise(torch.from_numpy(images)))
        wanted = torch.from_numpy(classes)
        chosen = torch.where(wanted < 0, logits.argmax(1), wanted)
        logits.gather(1, chosen[:, None]).sum().backward()
    finally:
        hook.remove()
    maps = kept[-1]
    assert maps.grad is not None
    cam = torch.relu((maps.grad.mean((2, 3))[:, :, None, None] * maps).sum(1))
    return _normalised(cam).detach().numpy()


def export(graph: GradCamGraph, spec: InputSpec, path: Path) -> None:
    example = (torch.from_numpy(random_images(spec, batch=2)), torch.tensor([-1, 0]))
    with torch.no_grad():
        trace(graph, example, path, [INPUT_NAME, CLASSES_NAME], list(graph.output_names))


@dataclass(frozen=True)
class ExplanationCheck:
    images: int
    max_abs_diff_map: float
    map_size: tuple[int, int]
    random: int  # of the images, random pixels; the rest real (the held-out digits or photos)

    def to_dict(self) -> dict[str, Any]:
        against = (f"PyTorch autograd Grad-CAM at the same layer, on {self.random} random and "
                   f"{self.images - self.random} held-out images (top-1 and class 0)")  # fmt: skip
        return {"images": self.images, "max_abs_diff_map": self.max_abs_diff_map, "tolerance": TOLERANCE,
                "against": against}  # fmt: skip


def verify(
    graph: GradCamGraph, spec: InputSpec, path: Path, real: np.ndarray | None = None, batch: int = 4, seed: int = 1
) -> ExplanationCheck:
    """The graph's maps against autograd's on random pixels and ``real`` images (uint8, as served), for the
    top-1 and for class 0."""
    images = random_images(spec, batch, seed)
    if real is not None and len(real):
        images = np.concatenate([images, real])
    classes = np.array([-1, 0] * (len(images) // 2) + [-1] * (len(images) % 2), dtype=np.int64)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    _, maps, *seen = session.run(list(graph.output_names), {INPUT_NAME: images, CLASSES_NAME: classes})
    expected = autograd_gradcam(graph.model, spec, graph.layer, images, classes)
    difference = float(np.abs(maps - expected).max())
    if difference > TOLERANCE or maps.shape != expected.shape:
        raise ExplanationError(
            f"{path}: the Grad-CAM graph differs from PyTorch's autograd at {graph.layer} (max |d map| = "
            f"{difference:.2e}, need <= {TOLERANCE:.0e}; shapes {maps.shape} and {expected.shape})"
        )
    with torch.no_grad():
        theirs = graph(torch.from_numpy(images), torch.from_numpy(classes))[2:]
    for name, ours, reference in zip(graph.feature_maps, seen, theirs, strict=True):
        off = float(np.abs(ours - reference.numpy()).max())
        if off > TOLERANCE:
            raise ExplanationError(f"{path}: feature map {name} differs from PyTorch's by {off:.2e}")
    return ExplanationCheck(len(images), difference, (int(maps.shape[1]), int(maps.shape[2])), batch)


def write(model: nn.Module, spec: ModelSpec, directory: Path, real: np.ndarray | None = None) -> dict[str, Any]:
    """``explain.onnx`` in ``directory``, verified (also on ``real`` images where given); what the metadata
    records of it."""
    graph = GradCamGraph(model, spec.input, spec.family)
    path = directory / FILE
    export(graph, spec.input, path)
    check = verify(graph, spec.input, path, real)
    default, because = DEFAULT_METHOD.get(spec.family, ("gradcam", "the map is the verified Grad-CAM graph's"))
    return {"method": "gradcam", "default": default, "default_because": because,
            "file": FILE, "sha256": sha256_file(path), "layer": graph.layer,
            "map_size": list(check.map_size),
            "description": METHOD, "inputs": [INPUT_NAME, CLASSES_NAME], "outputs": list(graph.output_names),
            "feature_maps": {name: module for name, module in graph.feature_maps.items()},
            "verification": check.to_dict()}  # fmt: skip
