"""Lower-precision variants: INT8 with its measured accuracy, the refusal, FP16."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from export import calibration
from export.precision import RECIPES, PrecisionRefused, VariantOptions, export_variant
from export.train import load_digits_dataset
from service.store.layout import ModelStore
from service.store.metadata import ModelMetadata


@pytest.fixture(scope="module")
def lenet_store(model_store: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    """The session's trained LeNet-5, alone in a store of its own (variants are written beside it)."""
    store = ModelStore(tmp_path_factory.mktemp("precision_store"))
    shutil.copytree(model_store.model_dir("lenet5"), store.model_dir("lenet5"))
    return store


def test_int8_lenet5_records_its_accuracy_against_fp32(lenet_store: ModelStore) -> None:
    stored = export_variant("lenet5", lenet_store, VariantOptions("int8"))
    assert (stored.name, stored.version) == ("lenet5_int8", 1)
    meta = ModelMetadata.model_validate(stored.read_metadata())
    parent = lenet_store.latest("lenet5")
    assert parent is not None
    assert meta.precision == "int8" and not meta.forced
    assert meta.derived_from == {"model": "lenet5", "version": parent.version,
                                 "sha256": parent.read_metadata()["onnx"]["sha256"]}  # fmt: skip
    accuracy = meta.accuracy
    assert accuracy is not None and accuracy["passed"]
    # the digits test split, labelled, never calibrated on
    assert accuracy["held_out"]["count"] == len(load_digits_dataset().y_test) and accuracy["held_out"]["labelled"]
    assert accuracy["top1_agreement"] >= 0.99 and accuracy["accuracy_drop"] <= 0.5
    assert accuracy["accuracy_fp32"] > 95 and 0 < accuracy["max_abs_diff_probabilities"] < 0.5
    raw = stored.read_metadata()
    assert raw["calibration"]["count"] == 500 and "train split" in raw["calibration"]["source"]
    # its own answers' baseline and abstain threshold, measured on its own graph, not its parent's copied
    assert raw["baseline"]["sha256"] == accuracy["held_out"]["sha256"] and meta.abstain is not None
    assert meta.abstain["source"] == raw["baseline"]["source"] and 0 < meta.abstain["threshold"] < 1
    assert meta.baseline is not None and meta.baseline["count"] == raw["baseline"]["count"] == 360
    assert raw["calibration"]["sha256"] != accuracy["held_out"]["sha256"]
    quantization = raw["quantization"]
    assert quantization["format"] == "QDQ" and quantization["cpu"]["machine"] and quantization["cpu"]["cores"] >= 1
    # every recipe was written, timed and checked here; the fastest at batch 8 that passed was kept
    candidates = {c["recipe"]: c for c in quantization["candidates"]}
    assert set(candidates) == set(RECIPES)
    for candidate in candidates.values():
        assert candidate["images_per_s"]["1"] > 0 and candidate["images_per_s"]["8"] > 0
        assert candidate["ops"].get("QLinearConv", 0) + candidate["ops"].get("Conv", 0) == 3  # LeNet-5's convolutions
    passing = [c for c in candidates.values() if c["passed"]]
    fastest = max(passing, key=lambda c: c["images_per_s"]["8"])
    assert quantization["recipe"] == fastest["recipe"] and "fastest at batch 8" in quantization["choice"]
    assert (quantization["activations"], quantization["reduce_range"]) == RECIPES[fastest["recipe"]]
    assert activation_type(stored.graph) == quantization["activations"]  # the file written is the recipe chosen
    # the graph really is quantized, and its own Triton-shaped folder names it
    graph = onnx.load(str(stored.graph))
    ops = {node.op_type for node in graph.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Softmax"} <= ops
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    config = (lenet_store.model_dir("lenet5_int8") / "config.pbtxt").read_text()
    assert config.startswith('name: "lenet5_int8"\n') and "TYPE_UINT8" in config
    assert lenet_store.read_labels("lenet5_int8") == lenet_store.read_labels("lenet5")


def activation_type(graph: Path) -> str:
    """uint8 or int8: the zero points of the graph's activation QuantizeLinear nodes."""
    model = onnx.load(str(graph))
    initializers = {i.name: i for i in model.graph.initializer}
    points = {initializers[n.input[2]].data_type for n in model.graph.node if n.op_type == "QuantizeLinear"}
    (kind,) = points
    return {onnx.TensorProto.UINT8: "uint8", onnx.TensorProto.INT8: "int8"}[kind]


def test_a_forced_recipe_is_the_only_one_written(lenet_store: ModelStore) -> None:
    stored = export_variant("lenet5", lenet_store, VariantOptions("int8", recipe="s8s8", timing_seconds=0.1))
    quantization = stored.read_metadata()["quantization"]
    assert [c["recipe"] for c in quantization["candidates"]] == ["s8s8"] and quantization["recipe"] == "s8s8"
    assert quantization["choice"] == "forced with --recipe s8s8" and activation_type(stored.graph) == "int8"
    shutil.rmtree(stored.directory)


def test_a_blank_calibration_image_is_refused_with_the_figures(lenet_store: ModelStore, tmp_path: Path) -> None:
    Image.new("L", (32, 32), 0).save(tmp_path / "blank.png")
    shutil.rmtree(lenet_store.model_dir("lenet5_int8"), ignore_errors=True)  # its first: no empty folder is left
    before = sorted(p.name for p in lenet_store.root.iterdir())
    options = VariantOptions("int8", calibration_dir=tmp_path, method="minmax", timing_seconds=0.1)
    with pytest.raises(PrecisionRefused, match=r"top-1 agreement with FP32 \d+\.\d+% < 99%.*accuracy .*\(drop") as info:
        export_variant("lenet5", lenet_store, options)
    assert "--force" in str(info.value)
    assert sorted(p.name for p in lenet_store.root.iterdir()) == before  # nothing written
    forced = export_variant(
        "lenet5", lenet_store, VariantOptions("int8", calibration_dir=tmp_path, force=True, timing_seconds=0.1)
    )
    raw = forced.read_metadata()
    assert raw["forced"] is True and raw["accuracy"]["passed"] is False
    assert raw["calibration"]["count"] == 1 and str(tmp_path) in raw["calibration"]["source"]
    shutil.rmtree(forced.directory)


def test_fp16_keeps_uint8_in_and_float32_out(lenet_store: ModelStore) -> None:
    stored = export_variant("lenet5", lenet_store, VariantOptions("fp16"))
    raw = stored.read_metadata()
    assert raw["precision"] == "fp16" and raw["accuracy"]["top1_agreement"] >= 0.99
    graph = onnx.load(str(stored.graph)).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert {o.type.tensor_type.elem_type for o in graph.output} == {onnx.TensorProto.FLOAT}
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in graph.initializer)


def test_variants_derive_only_from_fp32(lenet_store: ModelStore) -> None:
    with pytest.raises(ValueError, match="no version 9"):
        export_variant("lenet5", lenet_store, VariantOptions("int8", from_version=9))
    if lenet_store.latest("lenet5_fp16") is None:
        export_variant("lenet5", lenet_store, VariantOptions("fp16"))
    with pytest.raises(ValueError, match="already fp16"):
        export_variant("lenet5_fp16", lenet_store, VariantOptions("int8"))


def test_a_parent_config_whose_policy_cannot_be_spliced_fails_the_variant_before_its_work(
    model_store: ModelStore, tmp_path: Path
) -> None:
    """A variant's config.pbtxt is its parent's with Triton's default policy in place of the parent's: one that
    is not of the form would be kept and a second added (Triton refuses that), so the export names the file."""
    store = ModelStore(tmp_path / "store")
    shutil.copytree(model_store.model_dir("lenet5"), store.model_dir("lenet5"))
    config = store.model_dir("lenet5") / "config.pbtxt"
    lines = [line for line in config.read_text(encoding="utf-8").splitlines() if "version_policy" not in line]
    config.write_text("\n".join([*lines, "version_policy: { lastest: 1 }"]) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"config\.pbtxt: its version_policy is not of the form"):
        export_variant("lenet5", store, VariantOptions("fp16"))
    assert not store.model_dir("lenet5_fp16").exists()


def test_calibration_sets_are_disjoint_and_preprocessed_as_served() -> None:
    spec = ModelMetadata.model_validate(json.loads(_resnet_meta())).input
    calibrate, held_out = calibration.default_calibration("resnet18", spec), calibration.held_out(spec)
    assert calibrate.images.shape[1:] == held_out.images.shape[1:] == (224, 224, 3)
    assert len(calibrate) == 6 * len(calibration.CALIBRATION_PHOTOS)
    assert not set(calibration.CALIBRATION_PHOTOS) & set(calibration.HELD_OUT_PHOTOS)
    rows = {row.tobytes() for row in calibrate.images}
    assert not any(row.tobytes() in rows for row in held_out.images)
    assert calibrate.images.dtype == np.uint8


def test_a_calibration_dir_without_images_is_a_clear_error(tmp_path: Path) -> None:
    spec = ModelMetadata.model_validate(json.loads(_resnet_meta())).input
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="holds no image"):
        calibration.from_directory(tmp_path, spec, 10)
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="no file decodes"):
        calibration.from_directory(tmp_path, spec, 10)


def _resnet_meta() -> str:
    from export.registry import get_model_spec

    spec = get_model_spec("resnet18")
    return json.dumps({"name": "resnet18", "version": 1, "num_params": 1, "flops_per_image": 1, "num_classes": 1000,
                       "input": spec.input.to_dict(), "weights": {}, "architecture": {}, "onnx": {}})  # fmt: skip


def test_the_cli_writes_a_variant_and_reports_a_refusal(lenet_store: ModelStore, tmp_path: Path) -> None:
    import subprocess
    import sys

    from ..helpers import ROOT

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "export", "lenet5", "--out", str(lenet_store.root), *args]
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)

    misuse = cli("--force")
    assert misuse.returncode == 2 and "go with --precision" in misuse.stderr
    misuse = cli("--precision", "fp16", "--recipe", "u8s8")
    assert misuse.returncode == 2 and "--recipe goes with --precision int8" in misuse.stderr
    Image.new("L", (32, 32), 0).save(tmp_path / "blank.png")
    refused = cli("--precision", "int8", "--calibration-dir", str(tmp_path), "--recipe", "u8s8")
    assert refused.returncode == 1 and "lenet5_int8 refused: top-1 agreement" in refused.stderr
    written = cli("--precision", "int8", "--calibration-method", "minmax", "--recipe", "u8s8_reduced", "--no-progress")
    assert written.returncode == 0, written.stderr
    assert "exported: lenet5_int8 v" in written.stderr
