"""Every family's Grad-CAM graph computes what PyTorch's autograd computes, and a graph that does not is refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from export import explanation
from export.graph import random_images
from export.registry import get_model_spec, list_models
from export.spec import InputSpec
from service.store.layout import ModelStore

LARGE = {"vgg11", "resnet101", "resnet152"}
# VGG-13 to 19 have VGG-11's head and the same code path, and the batch-normalised VGGs differ from theirs only inside
# the feature extractor, which the graph runs forward (each export verifies its own graph anyway): seven more
# half-gigabyte graphs would add minutes and no case
SAME_HEAD = {"vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn"}
NETWORKS = [pytest.param(n, marks=pytest.mark.slow) if n in LARGE else n for n in list_models() if n not in SAME_HEAD]
MAP_SIZES = {"LeNet": (10, 10), "AlexNet": (6, 6), "VGG": (7, 7), "GoogLeNet": (7, 7), "ResNet": (7, 7)}
# the last convolutional block of each family (LeNet-5's C3, after its tanh)
LAYERS = {
    "LeNet": "features.4",
    "AlexNet": "features",
    "VGG": "features",
    "GoogLeNet": "inception5b",
    "ResNet": "layer4",
}


def reference_gradcam(model: torch.nn.Module, spec: InputSpec, layer: str, images: np.ndarray,
                      classes: np.ndarray) -> np.ndarray:  # fmt: skip
    """Grad-CAM as Selvaraju et al. define it, written out here rather than taken from the export: the layer's
    activations A and the class score's gradient dA (torch.autograd.grad), each channel weighted by the mean of its
    gradient, ReLU of the weighted sum, each map divided by its peak; negative classes: the top-1."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(spec.mean).view(1, -1, 1, 1)) / torch.tensor(spec.std).view(1, -1, 1, 1)
    seen: list[torch.Tensor] = []
    handle = model.get_submodule(layer).register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        logits = model(x)
    finally:
        handle.remove()
    chosen = torch.tensor([int(logits[i].argmax()) if c < 0 else int(c) for i, c in enumerate(classes)])
    (gradient,) = torch.autograd.grad(logits[torch.arange(len(chosen)), chosen].sum(), seen[-1])
    cam = torch.relu((gradient.mean(dim=(2, 3), keepdim=True) * seen[-1]).sum(1))
    return (cam / cam.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]).detach().numpy()


@pytest.mark.parametrize("name", NETWORKS)
def test_the_grad_cam_graph_matches_autograd(name: str, tmp_path: Path) -> None:
    spec = get_model_spec(name)
    torch.manual_seed(0)
    model = spec.build().eval()
    written = explanation.write(model, spec, tmp_path)
    assert written["verification"]["max_abs_diff_map"] <= explanation.TOLERANCE
    assert tuple(written["map_size"]) == MAP_SIZES[spec.family] and written["layer"] == LAYERS[spec.family]
    # a batch size and classes the export's check did not use, against a reference of the test's own
    images = random_images(spec.input, batch=3, seed=7)
    classes = np.array([spec.num_classes - 1, -1, 3], dtype=np.int64)
    session = ort.InferenceSession(str(tmp_path / explanation.FILE), providers=["CPUExecutionProvider"])
    probabilities, maps, *layers = session.run(None, {"images": images, "classes": classes})
    expected = reference_gradcam(model, spec.input, LAYERS[spec.family], images, classes)
    np.testing.assert_allclose(maps, expected, atol=explanation.TOLERANCE)
    assert probabilities.shape == (3, spec.num_classes) and maps.min() >= 0 and maps.max() <= 1 + 1e-6
    # LeNet-5's graph also gives what each layer sees, for the page: C1, S2, C3 and S4
    expected_layers = {"C1": (3, 6, 28, 28), "S2": (3, 6, 14, 14), "C3": (3, 16, 10, 10), "S4": (3, 16, 5, 5)}
    assert [layer.shape for layer in layers] == (list(expected_layers.values()) if name == "lenet5" else [])
    assert written["feature_maps"] == (dict(explanation.FEATURE_MAPS["LeNet"]) if name == "lenet5" else {})
    print(f"{name}: Grad-CAM at {written['layer']} {maps.shape[1]}x{maps.shape[2]}, max |d| vs autograd "
          f"{np.abs(maps - expected).max():.1e}")  # fmt: skip


def test_a_graph_that_differs_from_autograd_is_refused(tmp_path: Path) -> None:
    spec = get_model_spec("lenet5")
    torch.manual_seed(0)
    model = spec.build().eval()
    graph = explanation.GradCamGraph(model, spec.input, spec.family)
    path = tmp_path / explanation.FILE
    explanation.export(graph, spec.input, path)
    tampered = onnx.load(str(path))
    (weight,) = [t for t in tampered.graph.initializer if t.name.endswith("classifier.2.weight")]
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight)[::-1].copy(), weight.name))
    onnx.save(tampered, str(path))
    with pytest.raises(explanation.ExplanationError, match=r"differs from PyTorch.s autograd at features\.4"):
        explanation.verify(graph, spec.input, path)


def test_a_family_without_a_head_rule_is_refused() -> None:
    with pytest.raises(ValueError, match="no Grad-CAM head for the Perceptron family"):
        explanation.GradCamGraph(torch.nn.Linear(2, 2), get_model_spec("lenet5").input, "Perceptron")


@pytest.mark.integration
def test_the_store_holds_each_versions_verified_graph(model_store: ModelStore) -> None:
    for name in model_store.names():
        version = model_store.latest(name)
        assert version is not None
        meta = json.loads((version.directory / "metadata.json").read_text())["explanation"]
        assert meta["method"] == "gradcam" and (version.directory / meta["file"]).is_file()
        assert meta["verification"]["max_abs_diff_map"] <= meta["verification"]["tolerance"]
        assert meta["layer"] == LAYERS[get_model_spec(name).family]
