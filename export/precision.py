"""Lower-precision variants of a stored FP32 version: INT8 for CPUs, FP16 for GPUs.

``python -m export resnet50 --precision int8`` reads the latest FP32 ``resnet50`` from the
store, quantizes it and writes ``resnet50_int8`` beside it: its own Triton-shaped model
folder, so Triton can serve it too. Before anything is written the variant is run
against its FP32 parent on held-out images, and the figures go into its metadata. Below
the thresholds the export refuses, with the figures, unless ``--force``.

INT8: ONNX Runtime static quantization, QDQ, per-channel int8 weights, activations
calibrated once. Which recipe is fastest depends on the CPU and on which QDQ patterns ONNX
Runtime fuses there, so the export does not guess from the CPU's flags: it writes every
recipe (``RECIPES``: signed or unsigned activations, 8- or 7-bit weights), times each with
the service's session options at batch 1 and 8, checks each on the held-out images, and
keeps the fastest at batch 8 that passes; ``--recipe`` forces one. The metadata records
every candidate's speed, its fused operators and accuracy, and the choice. The
normalisation at the graph's input and the softmax at its end stay in float.

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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnxruntime as ort

from service.store.host import cpu_count
from service.store.layout import CONFIG_FILE, GRAPH_FILE, LABELS_FILE, METADATA_FILE, ModelStore, StoredVersion
from service.store.metadata import ModelMetadata
from service.store.policy import VersionPolicy
from service.store.sessions import session_options
from service.store.tensors import INPUT_NAME

from . import baseline, calibration, evaluation, train, typicality, versions
from .calibration import ImageSet
from .weights import sha256_file

logger = logging.getLogger(__name__)

Precision = Literal["int8", "fp16"]
Method = Literal["minmax", "entropy", "percentile"]
Recipe = Literal["auto", "s8s8", "s8s8_reduced", "u8s8", "u8s8_reduced"]
# recipe: (activations, 7-bit weights). S8S8 is ONNX Runtime's recommendation; on x86 MLAS
# multiplies u8 activations by s8 weights natively, and without VNNI its 16-bit sums can
# saturate with full 8-bit weights, which 7-bit weights (reduce_range) avoid.
RECIPES: dict[str, tuple[Literal["int8", "uint8"], bool]] = {
    "s8s8": ("int8", False),
    "s8s8_reduced": ("int8", True),
    "u8s8": ("uint8", False),
    "u8s8_reduced": ("uint8", True),
}
TIMED_BATCHES = (1, 8)
# what the timing counts in the graph ONNX Runtime optimizes: fused INT8 kernels, and what stayed float
COUNTED_OPS = ("QLinearConv", "QLinearAdd", "QLinearMatMul", "QGemm", "QLinearGlobalAveragePool", "Conv", "FusedConv",
               "Gemm", "Transpose", "QuantizeLinear", "DequantizeLinear")  # fmt: skip

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
    recipe: Recipe = "auto"  # INT8: every recipe timed and the fastest that passes kept, or this one
    timing_seconds: float = 1.5  # per recipe and batch size
    # a fine-tune's own images (``export/finetune.py``): its training split to calibrate on, its labelled
    # held-out split to gate on; otherwise --calibration-dir or the defaults, and the digits or photos
    calibration_images: ImageSet | None = None
    held_out_images: ImageSet | None = None


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            line = next((line for line in info if line.startswith("flags")), "")
    except OSError:
        return set()
    return set(line.partition(":")[2].split())


def cpu_info() -> dict[str, Any]:
    """What the INT8 timings depend on: the machine, its INT8 dot-product flags, its core count."""
    flags = cpu_flags()
    int8_flags = sorted(flags & {*VNNI_FLAGS, "avx2", "avx512f", "avx512bw", "amx_int8", "asimddp", "i8mm"})
    return {"machine": platform.machine().lower(), "vnni": sorted(flags & set(VNNI_FLAGS)), "flags": int8_flags,
            "cores": cpu_count()}  # fmt: skip


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """ONNX Runtime's quantizer logs a line per copied bias on the root logger, at INFO: to debug."""

    def demote(record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            logger.debug("onnxruntime: %s", record.getMessage())
            return False
        return True

    root = logging.getLogger()
    root.addFilter(demote)
    try:
        yield
    finally:
        root.removeFilter(demote)


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


def quantize_int8(prepared: Path, target: Path, images: ImageSet, method: Method, recipe: str, cache: Path) -> None:
    """One recipe's QDQ graph; the activation ranges are computed once per ``cache`` and reused.

    The typicality check's nodes (``distance``) stay in float: a distance is a sum of squared
    differences, which 8 bits would flatten.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}  # fmt: skip
    activations, reduce_range = RECIPES[recipe]
    # the calibrators print their progress; it goes to the debug log instead
    with contextlib.redirect_stdout(_DebugLog()), _quiet_quantizer():
        quantize_static(
            str(prepared),
            str(target),
            # ORT's histogram collectors stack per-batch arrays: they need equal batches, so one image each
            _Reader(images.images, batch=16 if method == "minmax" else 1),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(QUANTIZED_OPS),
            nodes_to_exclude=[n.name for n in onnx.load(str(prepared)).graph.node if n.name.startswith("/typicality/")],
            per_channel=True,
            reduce_range=reduce_range,
            activation_type=QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=methods[method],
            calibration_cache_path=str(cache),
            extra_options={"CalibTensorRangeSymmetric": False},
        )


def timed(graph: Path, spec: Any, seconds: float) -> tuple[dict[str, float], dict[str, int]]:
    """Images/s at each of ``TIMED_BATCHES`` with the service's session options (as a worker with the
    default settings has them: a thread per CPU this process may use), and the operators of the graph
    ONNX Runtime runs (what it fused, what stayed float)."""
    speeds: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as scratch:
        options = session_options(cpu_count())
        options.optimized_model_filepath = str(Path(scratch) / "optimized.onnx")
        session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(options.optimized_model_filepath)
    counts = {op: n for op in COUNTED_OPS if (n := sum(node.op_type == op for node in optimized.graph.node))}
    rng = np.random.default_rng(0)
    for batch in TIMED_BATCHES:
        images = rng.integers(0, 256, (batch, spec.size, spec.size, spec.channels), dtype=np.uint8)
        session.run(None, {INPUT_NAME: images})  # allocation, kernel selection
        runs, started = 0, time.perf_counter()
        while runs < 3 or time.perf_counter() - started < seconds:
            session.run(None, {INPUT_NAME: images})
            runs += 1
        speeds[str(batch)] = round(runs * batch / (time.perf_counter() - started), 1)
    return speeds, counts


def convert_fp16(source: Path, target: Path) -> dict[str, Any]:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
    onnx.save(model, str(target))
    return {"tool": f"onnxruntime {ort.__version__} convert_float_to_float16", "keep_io_types": True,
            "note": "uint8 input and float32 outputs kept; every float tensor inside in half precision"}  # fmt: skip


def compare(parent: Path, variant: Path, held_out: ImageSet) -> dict[str, Any]:
    """FP32 against the variant on held-out images: top-1 agreement, top-5 overlap, largest |dp|, accuracies."""
    reference, candidate = (
        baseline.probabilities_of(parent, held_out.images),
        baseline.probabilities_of(variant, held_out.images),
    )
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
    # the parent's configuration under the variant's name, its version policy Triton's default (a pin of the
    # parent's versions means nothing here); read first, so that a config it cannot splice fails before the work
    parent_config = store.model_dir(name) / CONFIG_FILE
    try:
        renamed = _triton_config(parent_config.read_text(encoding="utf-8"), target_name)
        generated = versions.with_settings(renamed, VersionPolicy())
    except ValueError as exc:
        raise ValueError(f"{parent_config}: {exc}; correct it, {target_name} takes its configuration from it") from exc
    model_dir = store.model_dir(target_name)
    with versions.staging(model_dir) as staging:
        graph = staging / GRAPH_FILE
        extra = _convert(parent.graph, graph, meta, options)
        onnx.checker.check_model(str(graph), full_check=True)  # from the file: no copy through Python
        held_out = _held_out(meta, options)
        figures = compare(parent.graph, graph, held_out)
        misses = check(figures, options)
        if misses and not options.force:
            raise PrecisionRefused(
                f"{target_name} refused: {'; '.join(misses)}. Calibrate on more representative images "
                "(--calibration-dir), try another --calibration-method, or write it anyway with --force."
            )
        if misses:
            logger.warning("%s: written with --force although %s", target_name, "; ".join(misses))
        thresholds = {"min_top1_agreement": options.min_agreement, "max_accuracy_drop": options.max_accuracy_drop}
        metadata = meta.model_dump() | {
            "name": target_name,
            "version": 0,  # its number, picked below
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
            # explained by its FP32 parent's Grad-CAM graph (``export/explanation.py``), and its answers say so
            "explanation": None
            if meta.explanation is None
            else {**meta.explanation, "from": {"model": parent.name, "version": parent.version}},
            "exported_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "exported_on": platform.node(),
            "export_seconds": round(time.perf_counter() - started, 2),
            **extra,
            # its own answers' baseline, abstain and typicality thresholds, not its parent's (copied above)
            **baseline.measure(graph, meta.input, target_name, images=held_out),
            **_evaluation(meta, graph, held_out, store.read_labels(name, parent), options),
            **_typicality(meta, graph, held_out, options.seed, target_name),
        }
        labels = "\n".join(store.read_labels(name, parent)) + "\n"
        with versions.publishing(model_dir):  # the number picked and taken by this export alone
            version = metadata["version"] = store.next_version(target_name)
            (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
            (staging / LABELS_FILE).write_text(labels, encoding="utf-8")  # its parent's, its own from now on
            config = versions.kept_settings(generated, model_dir / CONFIG_FILE)  # the variant's own settings
            versions.publish(staging, model_dir, version, labels, config)
            logger.info("%s: version %d written from %s v%d (%s)", target_name, version, name, parent.version,
                        _summary(figures))  # fmt: skip
    return StoredVersion(target_name, version, model_dir / str(version))


def _typicality(meta: ModelMetadata, graph: Path, held_out: ImageSet, seed: int, name: str) -> dict[str, Any]:
    """The parent's typicality check with this variant's own threshold, on views of the held-out digits
    augmented as the parent's threshold views were (``export.pipeline.fit_typicality``)."""
    if meta.typicality is None:
        return {}
    views = train.augmented_views(held_out.images[..., 0], 2, seed + 1)
    own = typicality.threshold_of(typicality.graph_distances(graph, views))
    logger.info("%s: typicality threshold %.1f (its parent's: %.1f)", name, own, meta.typicality["threshold"])
    source = f"this variant's distances on {len(views)} views of {held_out.source}"
    own_check = {
        "threshold": round(own, 4),
        "parent_threshold": meta.typicality["threshold"],
        "threshold_source": source,
    }
    return {"typicality": {**meta.typicality, **own_check}}


def _evaluation(meta: ModelMetadata, graph: Path, held_out: ImageSet, classes: list[str],
                options: VariantOptions) -> dict[str, Any]:  # fmt: skip
    """A fine-tuned parent's accuracy figures, measured again on the variant's graph where the held-out split is
    at hand (the same command), else none: the parent's are not the variant's."""
    if not getattr(meta, "evaluation", None) or options.held_out_images is None:
        return {"evaluation": None}
    found = evaluation.measure(graph, held_out, classes)
    summary = f"held-out top-1 {100 * found['top1']:.2f}% on {found['images']} images"
    return {"evaluation": {**found, "summary": summary}}


def _held_out(meta: ModelMetadata, options: VariantOptions) -> ImageSet:
    """The images a variant is checked on: the fine-tune's labelled held-out split, or the digits or photos
    (without their labels for a user's model: they are not its classes)."""
    if options.held_out_images is not None:
        return options.held_out_images
    images = calibration.held_out(meta.input, options.seed)
    return dataclasses.replace(images, labels=None) if meta.architecture.get("built_on") else images


def _convert(source: Path, target: Path, meta: ModelMetadata, options: VariantOptions) -> dict[str, Any]:
    """Write the variant's graph; returns what its metadata says about how."""
    if options.precision == "fp16":
        return {"conversion": convert_fp16(source, target)}
    if options.calibration_images is not None:
        images = options.calibration_images
    elif options.calibration_dir is not None:
        images = calibration.from_directory(options.calibration_dir, meta.input, options.calibration_count)
    else:
        images = calibration.default_calibration(meta.name, meta.input, options.seed)
        images = dataclasses.replace(images, images=images.images[: options.calibration_count])
    recipes = list(RECIPES) if options.recipe == "auto" else [options.recipe]
    held_out = _held_out(meta, options)
    cpu = cpu_info()
    flags = ", ".join(cpu["flags"]) or "no INT8 flags"
    logger.info("%s: calibrating INT8 (%s) on %d images; trying %s on %s (%s)", meta.name, options.method,
                len(images), ", ".join(recipes), cpu["machine"], flags)  # fmt: skip
    candidates = []
    with tempfile.TemporaryDirectory() as scratch:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        prepared, cache = Path(scratch) / "prepared.onnx", Path(scratch) / "calibration.json"
        with contextlib.redirect_stdout(_DebugLog()):
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        for recipe in recipes:
            graph = Path(scratch) / f"{recipe}.onnx"
            quantize_int8(prepared, graph, images, options.method, recipe, cache)
            figures = compare(source, graph, held_out)
            speeds, ops = timed(graph, meta.input, options.timing_seconds)
            activations, reduce_range = RECIPES[recipe]
            candidates.append({"recipe": recipe, "activations": activations, "reduce_range": reduce_range,
                               "images_per_s": speeds, "ops": ops, "top1_agreement": figures["top1_agreement"],
                               "passed": not check(figures, options), "graph": graph})  # fmt: skip
            logger.info("%s %s: %s images/s at batch %s; %s; top-1 agreement %.2f%%", meta.name, recipe,
                        " / ".join(str(v) for v in speeds.values()), " / ".join(speeds), _ops(ops),
                        100 * figures["top1_agreement"])  # fmt: skip
        chosen, why = _choose(candidates, options)
        shutil.copyfile(chosen["graph"], target)
    for candidate in candidates:
        del candidate["graph"]
    quantization = {
        "tool": f"onnxruntime {ort.__version__} quantize_static",
        "format": "QDQ",
        "weights": "int8, per channel",
        "recipe": chosen["recipe"],
        "activations": chosen["activations"],
        "reduce_range": chosen["reduce_range"],
        "choice": why,
        "candidates": candidates,
        "calibration_method": options.method,
        "quantized_ops": list(QUANTIZED_OPS),
        "float_ops": "the input's cast, transpose and normalisation; softmax; the typicality distance",
        "cpu": cpu,
    }
    return {"quantization": quantization, "calibration": images.describe()}


def _choose(candidates: list[dict[str, Any]], options: VariantOptions) -> tuple[dict[str, Any], str]:
    """The fastest at batch 8 of those that pass the accuracy gate (of all, when none does)."""
    if len(candidates) == 1:
        return candidates[0], f"forced with --recipe {candidates[0]['recipe']}"
    passing = [c for c in candidates if c["passed"]] or candidates
    chosen = max(passing, key=lambda c: c["images_per_s"][str(TIMED_BATCHES[-1])])
    what = "that passed the accuracy gate" if chosen["passed"] else "(none passed the accuracy gate)"
    return chosen, f"the fastest at batch {TIMED_BATCHES[-1]} of {len(candidates)} recipes {what}, timed here"


def _ops(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {op}" for op, n in counts.items() if op not in ("QuantizeLinear", "DequantizeLinear"))


def _summary(figures: dict[str, Any]) -> str:
    text = (
        f"top-1 agreement {figures['top1_agreement']:.2%}, top-5 overlap {figures['top5_overlap']:.2%}, "
        f"max |dp| {figures['max_abs_diff_probabilities']:.3g} on {figures['held_out']['count']} held-out images"
    )
    if "accuracy" in figures:
        text += f"; accuracy {figures['accuracy']:.2f}% vs FP32 {figures['accuracy_fp32']:.2f}%"
    return text
