"""One export: weights -> PyTorch model -> verified ONNX graph -> a new version in the store."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from service.store.batch_limit import MODEL_MAX_BATCH_SIZE
from service.store.layout import CONFIG_FILE, GRAPH_FILE, LABELS_FILE, METADATA_FILE, ModelStore, StoredVersion
from service.store.metadata import InputMeta
from service.store.tensors import INPUT_NAME

from . import baseline, calibration, checkpoint, explanation, train, typicality, versions
from .checkpoint import InputOverrides
from .graph import OPSET, ClassifierGraph, count_flops, export_onnx, verify
from .registry import get_model_spec
from .spec import ModelSpec, WeightsKind
from .weights import Provenance, file_state_dict, random_provenance, released_state_dict, sha256_file

logger = logging.getLogger(__name__)

# Resident memory per graph byte once ONNX Runtime has loaded a family's graph and warmed it up at batch 1 and 32
# (2 threads, default arena), measured here: VGG16 1,619 MiB for a 528 MiB graph, ResNet-50 441 for 97, ResNet-18
# 295 for 45, GoogLeNet 239 for 25, AlexNet 314 for 233; LeNet-5 17 MiB for its 0.87 MiB. The arenas sized by
# the warm-up's activations dominate the small graphs. MODEL_CONTROL=on-demand admits a model by this estimate
# until its first load measures it.
RESIDENT_PER_GRAPH_BYTE = {"LeNet": 20.0, "AlexNet": 1.35, "VGG": 3.1, "GoogLeNet": 9.6, "ResNet": 6.6}
TYPICALITY_VIEWS = 20_000  # augmented training views the typicality check is fitted on, at most


@dataclass(frozen=True)
class ExportOptions:
    weights: WeightsKind | None = None  # None: the model's default (imagenet or trained)
    weights_file: Path | None = None
    data: str = "digits"
    data_dir: Path | None = None
    seed: int = 0
    epochs: int = 40
    progress: bool = True
    cache_dir: Path | None = None  # torch hub's checkpoints directory by default
    baseline_dir: Path | None = None  # the images the answers' baseline is measured on (held-out ones by default)
    # a user's model (``export/checkpoint.py``): its class names, its name in the store, its input convention
    labels: tuple[str, ...] | None = None
    as_name: str | None = None
    inputs: InputOverrides = field(default_factory=InputOverrides)

    @property
    def custom(self) -> bool:
        return self.labels is not None or self.as_name is not None or self.inputs != InputOverrides()


@dataclass
class Built:
    """The PyTorch model with its weights, in eval mode; what it is (the registered spec, or the user's model
    derived from it); where the weights came from; the images it was trained on where it was trained here."""

    model: torch.nn.Module
    spec: ModelSpec
    provenance: Provenance
    data: train.Dataset | None = None


def _weights_kind(spec: ModelSpec, options: ExportOptions) -> WeightsKind:
    if options.weights_file is not None:
        return "file"
    kind = options.weights or spec.default_weights
    if kind not in spec.weight_choices:
        raise ValueError(f"{spec.name} takes --weights {' or '.join(spec.weight_choices)}, not {kind!r}")
    return kind


def _build_with(spec: ModelSpec, state: Mapping[str, torch.Tensor], provenance: Provenance) -> torch.nn.Module:
    try:
        return spec.build(state).eval()
    except RuntimeError as exc:  # load_state_dict(strict=True): missing, unexpected or mis-shaped keys
        detail = " ".join(str(exc).split())
        raise ValueError(f"{provenance.file or provenance.url} does not fit {spec.name}: {detail}") from None


def _own(spec: ModelSpec, options: ExportOptions, state: Mapping[str, torch.Tensor] | None, where: str) -> ModelSpec:
    """The user's model where the options or the checkpoint's head ask for one, else ``spec``."""
    labels = list(options.labels) if options.labels is not None else None
    if state is not None:
        labels = checkpoint.fit_labels(spec, state, labels, where)
    if not options.custom and (labels is None or labels == list(spec.categories)):
        return spec
    checkpoint.check_name(spec, options.as_name)
    return checkpoint.adapt(spec, labels or list(spec.categories), options.as_name, options.inputs)


def build_model(spec: ModelSpec, options: ExportOptions) -> Built:
    """``spec``'s network (or the user's model built on it) with the weights the options ask for."""
    kind = _weights_kind(spec, options)
    if kind == "imagenet":
        assert spec.released is not None
        state, provenance = released_state_dict(spec.released, options.cache_dir, options.progress)
        spec = _own(spec, options, None, "")
        return Built(_build_with(spec, state, provenance), spec, provenance)
    if kind == "file":
        assert options.weights_file is not None
        state, provenance = file_state_dict(options.weights_file)
        spec = _own(spec, options, state, str(options.weights_file))
        return Built(_build_with(spec, state, provenance), spec, provenance)
    spec = _own(spec, options, None, "")
    torch.manual_seed(options.seed)
    model = spec.build()
    if kind == "random":
        return Built(model.eval(), spec, random_provenance(options.seed))
    if options.data == "mnist":
        if options.data_dir is None:
            raise ValueError("--data mnist needs --data-dir DIR (where the IDX files are, or will be downloaded)")
        data = train.load_mnist_dataset(options.data_dir)
    else:
        data = train.load_digits_dataset(seed=options.seed)
    provenance = train.train_lenet(
        model,
        data,
        spec.input.mean[0],
        spec.input.std[0],
        epochs=options.epochs,
        seed=options.seed,
        progress=options.progress,
    )
    return Built(model.eval(), spec, provenance, data)


def fit_typicality(spec: ModelSpec, model: torch.nn.Module, data: train.Dataset, seed: int) -> typicality.Typicality:
    """The typicality check on the views of the training images that training saw; threshold on the test split's."""
    assert spec.typicality_layer is not None
    copies = max(1, TYPICALITY_VIEWS // len(data.x_train))
    take = np.random.default_rng(seed).permutation(len(data.x_train))[: TYPICALITY_VIEWS // copies]
    views = train.augmented_views(data.x_train[take], copies, seed)
    held_out = train.augmented_views(data.x_test, 2, seed + 1)
    source = (f"{data.name} ({data.split}): {len(views)} augmented views of {len(take)} training images; "
              f"threshold on {len(held_out)} views of the test split")  # fmt: skip
    normalise = ClassifierGraph(model, spec.input).normalise
    return typicality.measure(model, normalise, spec.typicality_layer, (views, np.tile(data.y_train[take], copies)),
                              held_out, spec.num_classes, source)  # fmt: skip


def triton_config(spec: ModelSpec, outputs: tuple[str, ...]) -> str:
    """Triton's ``config.pbtxt``, so the store serves unchanged under Triton too."""
    size, channels, classes = spec.input.size, spec.input.channels, spec.num_classes
    logits, probabilities, *rest = outputs
    lines = [
        f'  {{ name: "{logits}" data_type: TYPE_FP32 dims: [{classes}] }}',
        f'  {{ name: "{probabilities}" data_type: TYPE_FP32 dims: [{classes}] label_filename: "{LABELS_FILE}" }}',
        # one value per image: Triton wants a dimension under max_batch_size, reshaped away
        *(f'  {{ name: "{name}" data_type: TYPE_FP32 dims: [1] reshape: {{ shape: [] }} }}' for name in rest),
    ]
    return (
        f'name: "{spec.name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: {MODEL_MAX_BATCH_SIZE}\n'
        f'input [{{ name: "{INPUT_NAME}" data_type: TYPE_UINT8 dims: [{size}, {size}, {channels}] }}]\n'
        "output [\n" + ",\n".join(lines) + "\n]\n"
        "dynamic_batching { }\nversion_policy: { latest: { num_versions: 1 } }\n"
    )


def _metadata(
    spec: ModelSpec, version: int, graph_path: Path, provenance: Provenance, outputs: tuple[str, ...], **extra: Any
) -> dict[str, Any]:
    return {
        "name": spec.name,
        "version": version,
        "architecture": {
            "family": spec.family,
            "paper": spec.paper,
            "notes": spec.notes or None,
            **({"built_on": spec.built_on} if spec.built_on else {}),
        },
        "num_params": spec.num_params,
        "flops_per_image": count_flops(spec),
        "num_classes": spec.num_classes,
        "precision": "fp32",
        "input": spec.input.to_dict(),
        "labels_file": LABELS_FILE,
        "weights": provenance.to_dict(),
        "onnx": {
            "file": GRAPH_FILE,
            "sha256": sha256_file(graph_path),
            "opset": OPSET,
            "input": INPUT_NAME,
            "outputs": list(outputs),
            "exporter": f"torch {torch.__version__} (TorchScript exporter), onnx {onnx.__version__}",
        },
        "memory": _memory(spec, graph_path),
        "exported_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "exported_on": platform.node(),
        **extra,
    }


def _memory(spec: ModelSpec, graph: Path) -> dict[str, Any]:
    """What the graph should take resident, before anyone has measured it (``RESIDENT_PER_GRAPH_BYTE``)."""
    size = graph.stat().st_size
    ratio = RESIDENT_PER_GRAPH_BYTE.get(spec.family, 5.0)
    return {"graph_bytes": size, "resident_per_graph_byte": ratio, "resident_estimate_bytes": int(size * ratio),
            "measured_at": "warm-up at batch 1 and 32, ONNX Runtime CPU, 2 threads"}  # fmt: skip


def export_model(name: str, store: ModelStore, options: ExportOptions | None = None) -> StoredVersion:
    """Export ``name`` into ``store`` as its next version; nothing is written unless it verifies."""
    options = options or ExportOptions()
    started = time.perf_counter()
    return write_version(build_model(get_model_spec(name), options), store, options, started)


# What a caller checks on the staged graph before it becomes a version: the metadata it adds; raises to refuse.
Gate = Callable[[Path], dict[str, Any]]


def write_version(built: Built, store: ModelStore, options: ExportOptions, started: float,
                  held_out: calibration.ImageSet | None = None, gate: Gate | None = None) -> StoredVersion:  # fmt: skip
    """``built`` as the next version of its model: converted, verified, measured, then ``gate``d; nothing is
    written unless all pass. ``held_out``: labelled images of the model's own classes, where the caller has
    them (a fine-tune's held-out split), else the digits or photos the export keeps."""
    model, spec, provenance, data = built.model, built.spec, built.provenance, built.data
    check = None
    if data is not None and spec.typicality_layer is not None:
        check = fit_typicality(spec, model, data, options.seed)
    graph = ClassifierGraph(model, spec.input, None if check is None else (check.layer, check.head()))
    model_dir = store.model_dir(spec.name)
    with versions.staging(model_dir) as staging:
        graph_path = staging / GRAPH_FILE
        logger.info("%s: converting to ONNX", spec.name)  # the steps of a minute for a VGG, said as they start
        export_onnx(graph, spec.input, graph_path)
        logger.info("%s: checking the graph against PyTorch", spec.name)
        verification = verify(graph, spec.input, graph_path)
        served = InputMeta.model_validate(spec.input.to_dict())
        if held_out is None:
            held_out = calibration.held_out(served, options.seed)  # decoded once, for both checks below
            if spec.built_on is not None:  # the digits' or photos' labels are not a user's model's classes
                held_out = dataclasses.replace(held_out, labels=None)
        # explain.onnx, verified against autograd on random pixels and four held-out images
        logger.info("%s: writing and checking its explanation graph", spec.name)
        explained = explanation.write(model, spec, staging, held_out.images[:4])
        # what its answers look like on images it should see (and, where labelled, when to abstain)
        quality = baseline.measure(graph_path, served, spec.name, options.baseline_dir, options.seed,
                                   images=None if options.baseline_dir else held_out)  # fmt: skip
        quality |= gate(graph_path) if gate is not None else {}
        with versions.publishing(model_dir):  # the number picked and taken by this export alone
            version = store.next_version(spec.name)
            metadata = _metadata(
                spec,
                version,
                graph_path,
                provenance,
                graph.output_names,
                verification=verification.to_dict(),
                explanation=explained,
                export_seconds=round(time.perf_counter() - started, 2),
                **quality,
                **({} if check is None else {"typicality": check.to_dict()}),
            )
            (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
            labels = "\n".join(spec.categories) + "\n"
            (staging / LABELS_FILE).write_text(labels, encoding="utf-8")  # the version's own
            config = versions.kept_settings(triton_config(spec, graph.output_names), model_dir / CONFIG_FILE)
            versions.publish(staging, model_dir, version, labels, config)  # the model's labels: Triton reads them
            logger.info("%s: version %d written (%s weights)", spec.name, version, provenance.kind)
    return StoredVersion(spec.name, version, model_dir / str(version))
