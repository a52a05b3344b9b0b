"""The typicality check: Mahalanobis distances fitted at export and computed by the graph itself."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from export import typicality
from export.graph import ClassifierGraph, VerificationError, export_onnx, random_images, verify
from export.registry import get_model_spec
from service.store.layout import ModelStore


def clusters(rng: np.random.Generator, per_class: int, spread: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Three classes in 5 dimensions, with correlated noise (a covariance far from the identity)."""
    centres = np.array([[0, 0, 0, 0, 0], [6, 0, 3, 0, 0], [0, -6, 0, 2, 1]], dtype=np.float64)
    mixing = rng.normal(size=(5, 5))
    labels = np.repeat(np.arange(3), per_class)
    return centres[labels] + spread * rng.normal(size=(len(labels), 5)) @ mixing, labels


def test_the_head_computes_the_distance_to_the_nearest_class_under_the_shared_covariance() -> None:
    rng = np.random.default_rng(0)
    features, labels = clusters(rng, 400)
    means, whitening = typicality.fit(features, labels, num_classes=3)
    # written out independently: the shrunk pooled covariance, its inverse, the quadratic form
    pooled = sum(np.cov(features[labels == c].T, bias=True) * (labels == c).sum() for c in range(3)) / len(labels)
    inverse = np.linalg.inv(pooled + typicality.SHRINKAGE * np.trace(pooled) / 5 * np.eye(5))
    probe = rng.normal(scale=4, size=(50, 5))
    expected = np.min([np.einsum("nd,de,ne->n", probe - m, inverse, probe - m) for m in means], axis=0)
    with torch.no_grad():
        got = typicality.DistanceHead(means, whitening)(torch.from_numpy(probe.astype(np.float32))).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_points_from_the_classes_are_typical_and_points_elsewhere_are_not() -> None:
    rng = np.random.default_rng(1)
    features, labels = clusters(rng, 400)
    means, whitening = typicality.fit(features, labels, num_classes=3)
    head = typicality.DistanceHead(means, whitening)
    held, _ = clusters(rng, 200)
    far, _ = clusters(rng, 200, spread=4.0)  # the same centres, four times the spread

    def distances(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return head(torch.from_numpy(x.astype(np.float32))).numpy()

    threshold = typicality.threshold_of(distances(held))
    assert (distances(held) > threshold).mean() == pytest.approx(1 - typicality.QUANTILE, abs=0.005)
    fresh, _ = clusters(rng, 200)
    assert (distances(fresh) > threshold).mean() < 0.05
    assert (distances(far) > threshold).mean() > 0.6


def test_a_class_without_training_images_is_refused() -> None:
    features, labels = clusters(np.random.default_rng(2), 50)
    with pytest.raises(ValueError, match=r"no training images of classes \[3\]"):
        typicality.fit(features, labels, num_classes=4)


def lenet5_with_check(tmp_path: Path) -> tuple[ClassifierGraph, Path]:
    spec = get_model_spec("lenet5")
    torch.manual_seed(0)
    model = spec.build().eval()
    images = random_images(spec.input, batch=300, seed=3)
    labels = np.arange(300) % 10
    normalise = ClassifierGraph(model, spec.input).normalise
    check = typicality.measure(model, normalise, "features.5", (images, labels), images[:50], 10, "random pixels")
    graph = ClassifierGraph(model, spec.input, (check.layer, check.head()))
    path = tmp_path / "model.onnx"
    export_onnx(graph, spec.input, path)
    return graph, path


def test_the_graph_outputs_the_distance_pytorch_computes(tmp_path: Path) -> None:
    graph, path = lenet5_with_check(tmp_path)
    outputs = onnx.load(str(path)).graph.output
    assert [o.name for o in outputs] == ["logits", "probabilities", "distance"]
    assert outputs[2].type.tensor_type.shape.dim[0].dim_param  # [batch]
    assert len(outputs[2].type.tensor_type.shape.dim) == 1
    result = verify(graph, get_model_spec("lenet5").input, path)
    assert result.max_rel_diff_distance is not None and result.max_rel_diff_distance < 1e-3


def test_verification_rejects_a_graph_whose_distance_differs(tmp_path: Path) -> None:
    graph, path = lenet5_with_check(tmp_path)
    model = onnx.load(str(path))
    (norms,) = [t for t in model.graph.initializer if t.name == "typicality.centre_norms"]
    norms.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(norms) + 50.0, norms.name))
    onnx.save(model, str(path))
    with pytest.raises(VerificationError, match="relative distance difference"):
        verify(graph, get_model_spec("lenet5").input, path)


@pytest.mark.integration
def test_the_trained_lenet5_is_exported_with_its_check(model_store: ModelStore) -> None:
    version = model_store.latest("lenet5")
    assert version is not None
    meta = json.loads((version.directory / "metadata.json").read_text())
    check = meta["typicality"]
    assert check["layer"] == "features.5" and check["dimensions"] == 16 * 5 * 5
    assert meta["onnx"]["outputs"] == ["logits", "probabilities", "distance"]
    assert "distance" in (version.directory.parent / "config.pbtxt").read_text()
    # the threshold is the stated quantile of the held-out views' distances, as the graph computes them
    from export.train import augmented_views, load_digits_dataset

    views = augmented_views(load_digits_dataset().x_test, 2, seed=1)
    session = ort.InferenceSession(str(version.graph), providers=["CPUExecutionProvider"])
    (distances,) = session.run(["distance"], {"images": views})
    assert (distances > check["threshold"]).mean() == pytest.approx(1 - check["quantile"], abs=0.003)
    # a model whose weights did not come from training here has no check
    plain = model_store.latest("resnet18")
    assert plain is not None and "typicality" not in json.loads((plain.directory / "metadata.json").read_text())


@pytest.mark.integration
def test_the_trained_lenet5_calls_other_kinds_of_images_atypical_and_its_digits_typical(
    model_store: ModelStore,
) -> None:
    """Through the service's decoder and the exported graph; the last two kinds were not looked at when the
    layer was chosen (noise, photos and letters were)."""
    from PIL import Image
    from skimage import data as photos

    from service.store.metadata import InputMeta
    from service.store.preprocess import preprocess
    from tests.helpers import encode
    from tests.service.pictures import held_out_drawings, out_of_distribution

    version = model_store.latest("lenet5")
    assert version is not None
    meta = json.loads((version.directory / "metadata.json").read_text())
    spec, threshold = InputMeta.model_validate(meta["input"]), meta["typicality"]["threshold"]
    session = ort.InferenceSession(str(version.graph), providers=["CPUExecutionProvider"])

    def atypical(files: list[bytes]) -> float:
        images = np.stack([preprocess(f, spec, max_pixels=10**8) for f in files])
        (distances,) = session.run(["distance"], {"images": images})
        return float((distances > threshold).mean())

    rng = np.random.default_rng(5)
    astronaut = np.asarray(Image.fromarray(photos.astronaut()).convert("L"))
    others = out_of_distribution(150)
    kinds = {
        "held-out digits, drawn": held_out_drawings(360)[0],
        "uniform noise": others[0::3],
        "photo patches": others[1::3],
        "printed letters": others[2::3],
        "gaussian noise": [encode(np.clip(rng.normal(128, 60, (48, 48)), 0, 255).astype(np.uint8)) for _ in range(50)],
        "astronaut patches": [
            encode(np.ascontiguousarray(astronaut[y : y + 80, x : x + 80])) for y, x in rng.integers(0, 400, (50, 2))
        ],
    }
    shares = {kind: atypical(files) for kind, files in kinds.items()}
    listed = ", ".join(f"{kind} {share:.0%}" for kind, share in shares.items())
    print(f"lenet5 atypical (distance over {threshold:.1f}): {listed}")
    assert shares.pop("held-out digits, drawn") <= 0.03
    assert all(share >= 0.9 for share in shares.values()), shares
