"""Lower-precision variants of a stored FP32 version: INT8 for CPUs, FP16 for GPUs.

``python -m export resnet50 --precision int8`` reads the latest FP32 ``resnet50`` from the
store, quantizes it and writes ``resnet50_int8`` beside it: its own Triton-shaped model
folder, so Triton can serve it too. Before anything is written the variant is run
against its FP32 parent on held-out images, and the figures go into its metadata. Below
the thresholds the export refuses, with the figures, unless ``--force``.

INT8: ONNX Runtime static quantization, QDQ, per-channel signed weights and signed
activations (S8S8; U8S8 on x86 CPUs without VNNI, see :func:`int8_target`). The
normalisation at the graph's input and the softmax at its end stay in float. CPUs
without VNNI multiply u8 by s8 into saturating 16-bit sums (``vpmaddubsw``), which costs
4-6 top-1 points unless the weights use 7 bits (``reduce_range``), so the export checks
the CPU and records what it did.

FP16: every float tensor of the graph in half precision, the uint8 input and float32
outputs kept. ONNX Runtime's CPU provider runs such a graph slowly, so the service
serves FP16 variants only on CUDA.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import io
import json
import logging
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnxruntime as ort

from service.store.layout import CONFIG_FILE, GRAPH_FILE, LABELS_FILE, METADATA_FILE, ModelStore, StoredVersion
from service.store.metadata import ModelMetadata

from . import calibration
from .calibration import ImageSet
from .graph import INPUT_NAME, OUTPUT_NAMES
from .weights import sha256_file

logger = logging.getLogger(__name__)

Precision = Literal["int8", "fp16"]
Method = Literal["minmax", "entropy", "percentile"]

# Operators that run in INT8; everything else (the input's cast, transpose and normalisation,
# the final softmax) stays in float.
QUANTIZED_OPS = ("Conv", "Gemm", "MatMul", "MaxPool", "AveragePool", "GlobalAveragePool", "Add", "Concat", "Relu",
                 "Flatten", "Reshape")  # fmt: skip
VNNI_FLAGS = ("avx512_vnni", "avx512vnni", "avx_vnni")


class PrecisionRefused(ValueError):
    """The variant is not close enough to its FP32 parent; the message carries the figures."""


@dataclass(frozen=True)
class VariantOptions:
    precision: Precision
    from_version: int | None = None  # None: the latest FP32 version
    calibration_dir: Path | None = None
    calibration_count: int = 500
    method: Method = "percentile"
    min_agreement: float = 0.99  # top-1 agreement with FP32 on held-out images
    max_accuracy_drop: float = 0.5  # points, where the held-out images have labels
    force: bool = False
    seed: int = 0


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            line = next((line for line in info if line.startswith("flags")), "")
    except OSError:
        return set()
    return set(line.partition(":")[2].split())


def int8_target() -> dict[str, Any]:
    """The INT8 scheme this CPU runs fastest without losing accuracy, and why.

    With VNNI: signed activations and full 8-bit weights (S8S8, ONNX Runtime's recommendation).
    On an x86 CPU without VNNI, ONNX Runtime's MLAS multiplies u8 activations by s8 weights
    (``vpmaddubsw``): S8S8 there leaves every convolution that feeds a residual ``Add`` in
    float behind transposes, slower than FP32 (ResNet-50 17 vs 20 images/s measured on an
    AVX2-only Zen 4 guest), while U8S8 fuses all 53 (32 images/s). Its 16-bit sums saturate
    with full 8-bit weights, so the weights use 7 bits (``reduce_range``).
    """
    machine = platform.machine().lower()
    flags = cpu_flags()
    vnni = sorted(flags & set(VNNI_FLAGS))
    if machine not in ("x86_64", "amd64") or vnni:
        reason = f"the CPU has {', '.join(vnni)}" if vnni else f"{machine}: signed 8-bit dot products"
        return {"machine": machine, "vnni": vnni, "activations": "int8", "reduce_range": False,
                "reason": f"{reason}: S8S8, full 8-bit weights"}  # fmt: skip
    return {"machine": machine, "vnni": [], "activations": "uint8", "reduce_range": True,
            "reason": "x86 CPU without VNNI (no avx512_vnni or avx_vnni flag): U8S8, MLAS's native path, with "
                      "7-bit weights (reduce_range) so u8 x s8 products do not saturate 16-bit sums"}  # fmt: skip


class _DebugLog(io.StringIO):
    def write(self, text: str) -> int:
        if text.strip():
            logger.debug("%s", text.strip())
        return len(text)


class _Reader:
    """ONNX Runtime's ``CalibrationDataReader`` protocol over an :class:`ImageSet`, in batches."""

    def __init__(self, images: np.ndarray, batch: int = 16) -> None:
        self._batches = iter([images[i : i + batch] for i in range(0, len(images), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def quantize_int8(source: Path, target: Path, images: ImageSet, method: Method, cpu: dict[str, Any]) -> dict[str, Any]:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}  # fmt: skip
    # the calibrators print their progress; it goes to the debug log instead
    with tempfile.TemporaryDirectory() as scratch, contextlib.redirect_stdout(_DebugLog()):
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(target),
            # ORT's histogram collectors stack per-batch arrays: they need equal batches, so one image each
            _Reader(images.images, batch=16 if method == "minmax" else 1),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(QUANTIZED_OPS),
            per_channel=True,
            reduce_range=cpu["reduce_range"],
            activation_type=QuantType.QUInt8 if cpu["activations"] == "uint8" else QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=methods[method],
            extra_options={"CalibTensorRangeSymmetric": False},
        )
    return {
        "tool": f"onnxruntime {ort.__version__} quantize_static",
        "format": "QDQ",
        "weights": "int8, per channel",
        "activations": cpu["activations"],
        "calibration_method": method,
        "reduce_range": cpu["reduce_range"],
        "quantized_ops": list(QUANTIZED_OPS),
        "float_ops": "the input's cast, transpose and normalisation; softmax",
    }


def convert_fp16(source: Path, target: Path) -> dict[str, Any]:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
    onnx.save(model, str(target))
    return {"tool": f"onnxruntime {ort.__version__} convert_float_to_float16", "keep_io_types": True,
            "note": "uint8 input and float32 outputs kept; every float tensor inside in half precision"}  # fmt: skip


def _run(path: Path, images: np.ndarray, batch: int = 32) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rows = [
        session.run([OUTPUT_NAMES[1]], {INPUT_NAME: images[i : i + batch]})[0] for i in range(0, len(images), batch)
    ]
    return np.concatenate(rows).astype(np.float32)


def compare(parent: Path, variant: Path, held_out: ImageSet) -> dict[str, Any]:
    """FP32 against the variant on held-out images: top-1 agreement, top-5 overlap, largest |dp|, accuracies."""
    reference, candidate = _run(parent, held_out.images), _run(variant, held_out.images)
    k = min(5, reference.shape[1])
    top_ref = np.argsort(-reference, axis=1)[:, :k]
    top_var = np.argsort(-candidate, axis=1)[:, :k]
    overlap = [len(set(a) & set(b)) / k for a, b in zip(top_ref, top_var, strict=True)]
    figures: dict[str, Any] = {
        "held_out": held_out.describe(),
        "top1_agreement": float((top_ref[:, 0] == top_var[:, 0]).mean()),
        "top5_overlap": float(np.mean(overlap)),
        "max_abs_diff_probabilities": float(np.abs(reference - candidate).max()),
    }
    if held_out.labels is not None:
        fp32 = 100 * float((top_ref[:, 0] == held_out.labels).mean())
        low = 100 * float((top_var[:, 0] == held_out.labels).mean())
        figures |= {"accuracy_fp32": round(fp32, 2), "accuracy": round(low, 2), "accuracy_drop": round(fp32 - low, 2)}
    return figures


def check(figures: dict[str, Any], options: VariantOptions) -> list[str]:
    """The thresholds the variant misses, in words; empty when it passes."""
    misses = []
    if figures["top1_agreement"] < options.min_agreement:
        misses.append(
            f"top-1 agreement with FP32 {figures['top1_agreement']:.2%} < {options.min_agreement:.0%} "
            f"on {figures['held_out']['count']} held-out images"
        )
    if "accuracy_drop" in figures and figures["accuracy_drop"] > options.max_accuracy_drop:
        misses.append(
            f"accuracy {figures['accuracy']:.2f}% vs FP32 {figures['accuracy_fp32']:.2f}% "
            f"(drop {figures['accuracy_drop']:.2f} > {options.max_accuracy_drop} points)"
        )
    return misses


def variant_name(name: str, precision: Precision) -> str:
    return f"{name}_{precision}"


def _parent(store: ModelStore, name: str, version: int | None) -> tuple[StoredVersion, ModelMetadata]:
    versions = {v.version: v for v in store.versions(name)}
    if not versions:
        raise ValueError(f"{name} has no version in {store.root}: export it first (`python -m export {name}`)")
    number = max(versions) if version is None else version
    if number not in versions:
        raise ValueError(f"{name} has no version {number} in {store.root} (it has {sorted(versions)})")
    stored = versions[number]
    meta = ModelMetadata.model_validate(stored.read_metadata())
    if meta.precision != "fp32":
        raise ValueError(f"{name} v{number} is already {meta.precision}: variants derive from an FP32 version")
    return stored, meta


def _triton_config(text: str, name: str) -> str:
    """The parent's ``config.pbtxt`` under the variant's name (same input, outputs and batching)."""
    lines = text.splitlines()
    return "\n".join(f'name: "{name}"' if line.startswith("name:") else line for line in lines) + "\n"


def export_variant(name: str, store: ModelStore, options: VariantOptions) -> StoredVersion:
    """Derive ``<name>_<precision>`` from an FP32 version of ``name``; nothing is written unless it passes."""
    started = time.perf_counter()
    parent, meta = _parent(store, name, options.from_version)
    target_name = variant_name(name, options.precision)
    model_dir = store.model_dir(target_name)
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=model_dir))
    try:
        graph = staging / GRAPH_FILE
        extra = _convert(parent.graph, graph, meta, options)
        onnx.checker.check_model(onnx.load(str(graph)), full_check=True)
        figures = compare(parent.graph, graph, calibration.held_out(meta.input, options.seed))
        misses = check(figures, options)
        if misses and not options.force:
            raise PrecisionRefused(
                f"{target_name} refused: {'; '.join(misses)}. Calibrate on more representative images "
                "(--calibration-dir), try another --calibration-method, or write it anyway with --force."
            )
        if misses:
            logger.warning("%s: written with --force although %s", target_name, "; ".join(misses))
        version = store.next_version(target_name)
        thresholds = {"min_top1_agreement": options.min_agreement, "max_accuracy_drop": options.max_accuracy_drop}
        metadata = meta.model_dump() | {
            "name": target_name,
            "version": version,
            "precision": options.precision,
            "derived_from": {"model": parent.name, "version": parent.version, "sha256": sha256_file(parent.graph)},
            "onnx": {**meta.onnx, "sha256": sha256_file(graph)},
            "accuracy": {**figures, "thresholds": thresholds, "passed": not misses},
            # what verifies a variant is its FP32 parent, not PyTorch
            "verification": {
                "against": f"{parent.name} v{parent.version} (FP32, ONNX Runtime)",
                "top1_agreement": figures["top1_agreement"],
                "max_abs_diff_probabilities": figures["max_abs_diff_probabilities"],
            },
            "forced": bool(misses),
            "exported_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "exported_on": platform.node(),
            "export_seconds": round(time.perf_counter() - started, 2),
            **extra,
        }
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
        shutil.copyfile(store.labels_path(name), model_dir / LABELS_FILE)
        config = store.model_dir(name) / CONFIG_FILE
        (model_dir / CONFIG_FILE).write_text(_triton_config(config.read_text(encoding="utf-8"), target_name))
        staging.rename(model_dir / str(version))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if not any(model_dir.iterdir()):
            model_dir.rmdir()
    logger.info(
        "%s: version %d written from %s v%d (%s)", target_name, version, name, parent.version, _summary(figures)
    )
    return StoredVersion(target_name, version, model_dir / str(version))


def _convert(source: Path, target: Path, meta: ModelMetadata, options: VariantOptions) -> dict[str, Any]:
    """Write the variant's graph; returns what its metadata says about how."""
    if options.precision == "fp16":
        return {"conversion": convert_fp16(source, target)}
    if options.calibration_dir is not None:
        images = calibration.from_directory(options.calibration_dir, meta.input, options.calibration_count)
    else:
        images = calibration.default_calibration(meta.name, meta.input, options.seed)
        images = dataclasses.replace(images, images=images.images[: options.calibration_count])
    cpu = int8_target()
    logger.info("%s: calibrating INT8 (%s) on %d images; %s", meta.name, options.method, len(images), cpu["reason"])
    quantization = quantize_int8(source, target, images, options.method, cpu)
    return {"quantization": {**quantization, "cpu": cpu}, "calibration": images.describe()}


def _summary(figures: dict[str, Any]) -> str:
    text = (
        f"top-1 agreement {figures['top1_agreement']:.2%}, top-5 overlap {figures['top5_overlap']:.2%}, "
        f"max |dp| {figures['max_abs_diff_probabilities']:.3g} on {figures['held_out']['count']} held-out images"
    )
    if "accuracy" in figures:
        text += f"; accuracy {figures['accuracy']:.2f}% vs FP32 {figures['accuracy_fp32']:.2f}%"
    return text
