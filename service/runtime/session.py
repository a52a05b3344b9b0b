"""ONNX Runtime sessions for the store's models: provider choice, tuning, warm-up."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort
from pydantic import ValidationError

from ..errors import validation_problems
from ..settings import Settings
from ..store import sessions
from ..store.batch_limit import read_max_batch_size
from ..store.layout import CONFIG_FILE, ModelStore, StoredVersion
from ..store.metadata import ModelMetadata
from ..store.tensors import DISTANCE_NAME, INPUT_NAME, OUTPUT_NAMES
from . import cuda_graphs, session_host
from .cuda import CPU, CUDA, providers_for, unusable_gpu

logger = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """A model version cannot be served; the message is shown by /models and /readyz."""


def session_options(settings: Settings, instances: int = 1) -> ort.SessionOptions:
    """The contract's session options with this worker's threads (the host's, where it holds the sessions) and
    ONNX Runtime settings."""
    threads = settings.session_threads(instances, shared=session_host.address() is not None)
    return sessions.session_options(threads, settings.inter_op_threads,
                                    spinning=settings.ort_spinning, cpu_arena=settings.ort_cpu_arena)  # fmt: skip


@dataclass
class LoadedModel:
    """One model version with its sessions (instances), labels and timings."""

    stored: StoredVersion
    metadata: ModelMetadata
    labels: list[str]
    sessions: list[Any]  # ort.InferenceSession, or session_host.RemoteSession where the session host holds them
    provider: str
    load_seconds: float
    warmup_seconds: float = 0.0
    threads: int = 1  # per session
    output_names: tuple[str, ...] = OUTPUT_NAMES  # and DISTANCE_NAME where the metadata has a typicality check
    max_batch_size: int = 1  # most images per call: MAX_BATCH_SIZE, or its config.pbtxt's max_batch_size if lower
    batch_sizes: tuple[int, ...] | None = None  # the shapes its batches are padded to (BATCH_SIZES); None: any
    session_host: int | None = None  # the pid of the process holding its sessions (SESSION_HOST=shared)
    cuda_graphs: bool = False  # its sessions replay a CUDA graph per batch shape (CUDA_GRAPHS=on, on CUDA)

    @property
    def name(self) -> str:
        return self.stored.name

    @property
    def version(self) -> int:
        return self.stored.version

    @property
    def instances(self) -> int:
        return len(self.sessions)

    def runner(self, instance: int) -> Callable[[np.ndarray], tuple[np.ndarray, ...]]:
        """Instance ``instance``'s session: uint8 [N, H, W, C] -> (logits, probabilities[, distance])."""
        session, names = self.sessions[instance], list(self.output_names)

        def run(images: np.ndarray) -> tuple[np.ndarray, ...]:
            return tuple(session.run(names, {INPUT_NAME: images}))

        return run

    def warm_up(self, batch_sizes: tuple[int, ...]) -> None:
        """Run ``batch_sizes`` and every shape of :attr:`batch_sizes` once on every instance, so no client request
        pays for allocation or set-up (on CUDA, cuDNN's algorithm search for each new shape, and with CUDA_GRAPHS
        the shape's capture). Where the shapes are fixed a size of ``batch_sizes`` runs as the shape it is padded
        to, as a request's would: a size no batch ever runs would cost a search (and a graph) for nothing."""
        spec = self.metadata.input
        started = time.perf_counter()
        shapes = self.batch_sizes
        wanted = batch_sizes if not shapes else [min((s for s in shapes if s >= b), default=b) for b in batch_sizes]
        for instance in range(self.instances):
            for batch in sorted({*wanted, *(shapes or ())}):
                self.runner(instance)(np.zeros((batch, spec.size, spec.size, spec.channels), dtype=np.uint8))
        self.warmup_seconds = time.perf_counter() - started


def _check_graph(session: Any, metadata: ModelMetadata, labels: list[str]) -> None:
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    spec = metadata.input
    if INPUT_NAME not in inputs or inputs[INPUT_NAME].type != "tensor(uint8)":
        raise ModelLoadError(f"graph has no uint8 input {INPUT_NAME!r} (inputs: {sorted(inputs)})")
    if list(inputs[INPUT_NAME].shape[1:]) != [spec.size, spec.size, spec.channels]:
        raise ModelLoadError(f"graph input shape {inputs[INPUT_NAME].shape} does not match the metadata's input spec")
    for name in OUTPUT_NAMES:
        if name not in outputs or outputs[name].shape[-1] != metadata.num_classes:
            raise ModelLoadError(f"graph output {name!r} missing or not {metadata.num_classes} wide")
    if len(labels) != metadata.num_classes:
        raise ModelLoadError(f"labels.txt has {len(labels)} names for {metadata.num_classes} classes")
    if metadata.typicality is not None and DISTANCE_NAME not in outputs:
        raise ModelLoadError(f"the metadata has a typicality check, but the graph has no {DISTANCE_NAME!r} output")


def load_model(store: ModelStore, stored: StoredVersion, settings: Settings) -> LoadedModel:
    """Open one version; raises :class:`ModelLoadError` with a reason a person can act on."""
    started = time.perf_counter()
    try:
        metadata = ModelMetadata.model_validate(stored.read_metadata())
    except FileNotFoundError:
        raise ModelLoadError(f"{stored.metadata_path} is missing") from None
    except ValidationError as exc:  # what is wrong where, not pydantic's "1 validation error for ModelMetadata"
        problems = validation_problems(exc.errors(), whole="metadata")
        raise ModelLoadError(f"{stored.metadata_path} is invalid: {problems}") from None
    except ValueError as exc:  # not JSON
        raise ModelLoadError(f"{stored.metadata_path} is invalid: {str(exc).splitlines()[0]}") from None
    if not stored.graph.is_file():
        raise ModelLoadError(f"{stored.graph} is missing")
    try:
        labels = store.read_labels(stored.name, stored)
    except OSError as exc:
        raise ModelLoadError(f"cannot read labels: {exc}") from None
    try:
        limit = settings.batch_limit(read_max_batch_size(store.model_dir(stored.name) / CONFIG_FILE))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{CONFIG_FILE}: {exc}") from None
    providers = providers_for(settings, metadata.precision, graphs=True)
    if settings.providers == "cuda" and (unusable := unusable_gpu()):  # else a session that takes CUDA fails later
        raise ModelLoadError(f"PROVIDERS=cuda, but CUDA cannot run on this machine: {unusable}")
    graphs = cuda_graphs.wanted(providers) is not None
    if graphs and settings.batch_shapes(CUDA, limit) is None:
        raise ModelLoadError("CUDA_GRAPHS=on captures a graph per batch shape, and BATCH_SIZES=any gives no "
                             "fixed shapes: set BATCH_SIZES=auto, pow2 or sizes, or CUDA_GRAPHS=off")  # fmt: skip
    instances = settings.instances_for(stored.name)
    options = session_options(settings, instances)
    try:
        sessions = [session_host.open_session(stored.graph, options, providers, i) for i in range(instances)]
    except session_host.SessionHostGone as exc:
        raise ModelLoadError(str(exc)) from None
    except Exception as exc:  # ORT raises its own Fail/InvalidProtobuf/... types
        hint = " (CUDA_GRAPHS=on needs every node of the graph on CUDA: set CUDA_GRAPHS=off)" if graphs else ""
        raise ModelLoadError(f"ONNX Runtime cannot load {stored.graph}: {exc}{hint}") from None
    session = sessions[0]
    provider = session.get_providers()[0]
    if providers[0] != CPU and provider != CUDA:  # CUDA was wanted (PROVIDERS=cuda, or auto with a GPU)
        reason = session_host.cuda_unavailable(session)
        if settings.providers == "cuda":
            raise ModelLoadError(f"PROVIDERS=cuda, but the CUDA execution provider did not take the session: {reason}")
        logger.warning("%s v%d: runs on %s, not CUDA: %s", stored.name, stored.version, provider, reason)
    if metadata.precision == "fp16" and provider != CUDA:
        raise ModelLoadError(
            f"an FP16 variant is served on CUDA only, and this session runs on {provider}: ONNX Runtime's CPU "
            f"kernels run FP16 slower than FP32. Serve {metadata.derived_from and metadata.derived_from['model']} "
            "(FP32) or an INT8 variant on CPUs"
        )
    _check_graph(session, metadata, labels)
    seconds = time.perf_counter() - started
    host = session.host_pid if isinstance(session, session_host.RemoteSession) else None
    names = OUTPUT_NAMES if metadata.typicality is None else (*OUTPUT_NAMES, DISTANCE_NAME)
    return LoadedModel(stored, metadata, labels, sessions, provider, seconds, threads=options.intra_op_num_threads,
                       output_names=names, max_batch_size=limit,
                       batch_sizes=settings.batch_shapes(provider, limit),
                       session_host=host, cuda_graphs=graphs and provider == CUDA)  # fmt: skip
