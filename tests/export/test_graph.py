"""Every registered architecture exports to a graph that keeps the ONNX contract and matches PyTorch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export.graph import TOLERANCE, ClassifierGraph, VerificationError, export_onnx, random_images, verify
from export.registry import get_model_spec, list_models

LARGE = {"vgg11", "vgg19_bn", "resnet101", "resnet152"}
# The VGGs between VGG-11 (the smallest, no batch normalisation) and VGG-19-BN (the largest graph of the zoo, 548 MiB
# in one file, batch normalisation) repeat the same layers more or fewer times, and test_registry checks each one's
# exact parameter count and output width: six more half-gigabyte exports here would add a minute and no case
# (every export verifies its own graph against PyTorch anyway).
SAME_LAYERS = {"vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19"}
NETWORKS = [pytest.param(n, marks=pytest.mark.slow) if n in LARGE else n for n in list_models() if n not in SAME_LAYERS]


@pytest.mark.parametrize("name", NETWORKS)
def test_graph_keeps_the_contract_and_matches_pytorch(name: str, tmp_path: Path) -> None:
    spec = get_model_spec(name)
    torch.manual_seed(0)
    graph = ClassifierGraph(spec.build().eval(), spec.input)
    path = tmp_path / "model.onnx"
    export_onnx(graph, spec.input, path)

    model = onnx.load(str(path))
    assert model.opset_import[0].version >= 18
    (graph_input,) = model.graph.input
    assert graph_input.name == "images"
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = graph_input.type.tensor_type.shape.dim
    assert dims[0].dim_param  # symbolic: a dynamic batch axis
    assert [d.dim_value for d in dims[1:]] == [spec.input.size, spec.input.size, spec.input.channels]
    assert [o.name for o in model.graph.output] == ["logits", "probabilities"]
    for output in model.graph.output:
        assert output.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert output.type.tensor_type.shape.dim[1].dim_value == len(spec.categories)

    # a batch size the export never saw: the batch axis really is dynamic
    images = random_images(spec.input, batch=3, seed=1)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits, probs = session.run(None, {"images": images})
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - torch.tensor(spec.input.mean).view(1, -1, 1, 1)
        x = x / torch.tensor(spec.input.std).view(1, -1, 1, 1)
        expected = torch.softmax(graph.model(x), 1).numpy()
    np.testing.assert_allclose(probs, expected, rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert (logits.argmax(1) == expected.argmax(1)).all()


def test_verification_rejects_a_graph_that_differs(tmp_path: Path) -> None:
    spec = get_model_spec("lenet5")
    torch.manual_seed(0)
    graph = ClassifierGraph(spec.build().eval(), spec.input)
    path = tmp_path / "model.onnx"
    export_onnx(graph, spec.input, path)
    with torch.no_grad():  # the PyTorch side changes after export: the graph no longer matches it
        graph.model.classifier[-1].bias += 5 * torch.arange(10.0)
    with pytest.raises(VerificationError, match="differs from PyTorch"):
        verify(graph, spec.input, path)
