"""The service's Prometheus metrics and their exposition on ``/metrics``.

BentoML runs prometheus_client in multiprocess mode and sets ``PROMETHEUS_MULTIPROC_DIR``
in each worker after importing the service module, so prometheus_client is imported only
when :class:`Metrics` is built (in the service's ``__init__``); every worker's samples are
then merged into one exposition (:func:`exposition`). BentoML's own request metrics are
off (they duplicated these at several times their cost per request), and so is its
``/metrics`` route: the service serves ``/metrics`` itself. Labels stay low-cardinality:
model, version, protocol, stage, outcome (2xx, 4xx, 5xx), and for HTTP the route's template
and the status code.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal, get_args

import psutil

from .errors import ClientGone, Overloaded, ServiceError
from .store.quality import CONFIDENCE_BUCKETS, ENTROPY_BUCKETS, confidence_and_entropy

logger = logging.getLogger(__name__)

# 1 ms to 10 s, roughly x2 per bucket: CNN inference on a CPU or a GPU
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SWITCH_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
EXPLANATION_METHODS = ("occlusion", "gradcam")
# why a shadow candidate did not see a request; the shadow names them through this type, so they cannot drift apart
ShadowSkip = Literal["dropped", "unavailable", "refused", "incompatible", "error"]
SHADOW_SKIP_REASONS: tuple[ShadowSkip, ...] = get_args(ShadowSkip)
# why the HTTP protocol closed a connection before the app saw a request (service.frontends.protocol)
# cnn_connections_refused_total's reasons: the HTTP protocol's, and the gRPC server's call limit
REFUSAL_REASONS = ("connections", "header_bytes", "header_timeout", "body_rate", "body_bytes", "body_memory",
                   "grpc_calls", "grpc_message_timeout")  # fmt: skip


DRIFT_RELEASED = -1.0  # cnn_prediction_drift of a version unloaded: below every divergence, unlike NaN comparable


class Metrics:
    def __init__(self) -> None:
        import prometheus_client as prom  # deferred: see the module docstring

        model = ["model", "version"]
        self.requests = prom.Counter(
            "cnn_requests",
            "Classification requests (/classify, /v2/.../infer, gRPC ModelInfer) by protocol and outcome (2xx, 4xx, "
            '5xx); a request that names no known model counts under model=""',
            [*model, "protocol", "outcome"],
        )
        self.http_requests = prom.Counter(
            "cnn_http_requests",
            "HTTP requests by route (its template, /v2/models/{name}/infer; unmatched for a path no route serves, "
            "never the path itself) and status code (the connection's own 408 or 413 where it refused a body the app "
            "was reading; 499: the client went away before its request was read)",
            ["route", "code"],
        )
        self.shed = prom.Counter(
            "cnn_requests_shed",
            "Requests refused with 503 because the model's queue was full (MAX_QUEUE_IMAGES)",
            ["model", "protocol"],
        )
        self.images = prom.Counter(
            "cnn_images", "Images classified successfully (a request of k images adds k)", [*model, "protocol"]
        )
        self.request_seconds = prom.Histogram(
            "cnn_request_seconds", "End-to-end latency of successful requests (1 ms to 10 s buckets)",
            [*model, "protocol"],
            buckets=LATENCY_BUCKETS,
        )  # fmt: skip
        self.stage_seconds = prom.Histogram(
            "cnn_stage_seconds", "Time per stage: preprocess (decode, resize, crop), queue (waiting for the batcher), "
            "inference (the ONNX Runtime call), postprocess; explain (one image's occlusion map, its batches included)",
            [*model, "stage"],
            buckets=LATENCY_BUCKETS,
        )  # fmt: skip
        self.batch_size = prom.Histogram("cnn_batch_size", "Images per ONNX Runtime call", model, buckets=BATCH_BUCKETS)
        self.batch_padding = prom.Counter(
            "cnn_batch_padding_images", "Zero images added to batches to reach a batch shape (BATCH_SIZES)", model
        )
        self.batch_requests = prom.Histogram(
            "cnn_batch_requests", "Requests whose images shared one ONNX Runtime call", model, buckets=BATCH_BUCKETS
        )
        self.in_flight = prom.Gauge(
            "cnn_requests_in_flight", "Classification requests being served", ["protocol"], multiprocess_mode="livesum"
        )
        self.model_changes = prom.Counter(
            "cnn_model_changes",
            "Loads and unloads of model versions by outcome (success, failure), per worker",
            ["model", "action", "outcome"],
        )
        self.switch_seconds = prom.Histogram(
            "cnn_model_switch_seconds",
            "Time a version switch took: phase=load (load and warm-up until it serves), phase=unload (drain)",
            ["model", "phase"], buckets=SWITCH_BUCKETS,
        )  # fmt: skip

        self.confidence = prom.Histogram(
            "cnn_prediction_confidence", "Top-1 probability of each served image's prediction, whatever the protocol",
            model,
            buckets=CONFIDENCE_BUCKETS,
        )  # fmt: skip
        self.entropy = prom.Histogram(
            "cnn_prediction_entropy", "Entropy of each image's prediction over log(classes): 0 sure, 1 uniform", model,
            buckets=ENTROPY_BUCKETS,
        )  # fmt: skip
        self.explanations = prom.Counter(
            "cnn_explanations", "Images explained (POST /explain), per method", [*model, "method"]
        )
        self.atypical = prom.Counter(
            "cnn_prediction_atypical", "Images unlike the model's training images: feature distance over the threshold "
            "its export derived (models with a typicality check only)", model,
        )  # fmt: skip
        self.drift = prom.Gauge(
            "cnn_prediction_drift",
            "Jensen-Shannon divergence (0 same, 1 disjoint) of the latest answers from the version's baseline: "
            "kind=confidence (top-1 probability bins), kind=classes (top-1 class mix); the largest over workers; "
            "-1 once the version is unloaded",
            [*model, "kind"], multiprocess_mode="livemax",
        )  # fmt: skip
        self.drift_window = prom.Gauge(
            "cnn_prediction_drift_window", "Answers the drift was measured over (DRIFT_WINDOW once full)", model,
            multiprocess_mode="livemax",
        )  # fmt: skip
        pair = ["primary", "candidate"]  # SHADOW's NAME or NAME@VERSION: a few configured pairs
        self.shadow_images = prom.Counter("cnn_shadow_images", "Images the candidate answered beside the primary", pair)
        self.shadow_top1_agreements = prom.Counter(
            "cnn_shadow_top1_agreements",
            "Shadowed images whose top-1 class the candidate and the primary agree on",
            pair,
        )
        self.shadow_top5_overlap = prom.Counter(
            "cnn_shadow_top5_overlap", "Sum over shadowed images of the share of top-5 classes both answered", pair
        )
        self.shadow_abs_diff = prom.Histogram(
            "cnn_shadow_abs_diff", "Per shadowed image, the largest difference of a class's probability", pair,
            buckets=(0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
        )  # fmt: skip
        self.shadow_seconds = prom.Histogram(
            "cnn_shadow_seconds", "Inference time of a shadowed request, queue included, on each side", [*pair, "side"],
            buckets=LATENCY_BUCKETS,
        )  # fmt: skip
        self.shadow_skipped = prom.Counter(
            "cnn_shadow_skipped_images",
            "Images not shadowed: reason=dropped (the queue was full), unavailable, refused, incompatible, error",
            [*pair, "reason"],
        )  # fmt: skip
        # CANARY: the share the candidate answers, its state, the requests each side answered, the windows judged
        self.canary_fraction = prom.Gauge(
            "cnn_canary_fraction", "Share of the primary's requests (naming no version) the canary's candidate answers",
            pair, multiprocess_mode="livemax",
        )  # fmt: skip
        self.canary_state = prom.Gauge(
            "cnn_canary_state",
            "1 for a canary's state (running, paused, rolled_back, promoted, ended), 0 for the others",
            [*pair, "state"], multiprocess_mode="livemax",
        )  # fmt: skip
        self.canary_requests = prom.Counter(
            "cnn_canary_requests", "Requests for a canary's primary, by the side that answered (primary, candidate)",
            [*pair, "side"],
        )  # fmt: skip
        self.canary_windows = prom.Counter(
            "cnn_canary_windows", "Canary analysis windows judged, by verdict (pass, fail, inconclusive)",
            [*pair, "verdict"],
        )  # fmt: skip

        # what a model holds and costs to load (every mode); MODEL_CONTROL=on-demand's budget, loads, evictions
        self.resident_bytes = prom.Gauge(
            "cnn_model_resident_bytes", "Resident memory a model version's load and warm-up added, summed over "
            "workers (0 once unloaded)", model, multiprocess_mode="livesum",
        )  # fmt: skip
        self.memory_budget = prom.Gauge(
            "cnn_memory_budget_bytes", "MEMORY_BUDGET: what the models of all workers may take", [],
            multiprocess_mode="livesum",
        )  # fmt: skip
        self.model_loads = prom.Counter(
            "cnn_model_loads", "On-demand loads: reason=request (a cold start), start (PINNED and MODELS)",
            ["model", "reason"],
        )  # fmt: skip
        self.evictions = prom.Counter(
            "cnn_model_evictions", "Models unloaded to stay within MEMORY_BUDGET (reason=pressure) or unused for "
            "IDLE_UNLOAD_S (reason=idle)", ["model", "reason"],
        )  # fmt: skip
        self.cold_start = prom.Histogram(
            "cnn_cold_start_seconds", "Load and warm-up of a model version until it answers", ["model"],
            buckets=SWITCH_BUCKETS,
        )  # fmt: skip
        self.cold_waits = prom.Counter(
            "cnn_cold_start_waits", "Requests that waited for their model to load", ["model"]
        )
        self.budget_exhausted = prom.Counter(
            "cnn_budget_exhausted", "Requests refused with 503: their model could not be made resident within "
            "MEMORY_BUDGET (pinned or busy models hold it)", ["model"],
        )  # fmt: skip

        # RESPONSE_CACHE_MB: per version where it says which one answered; the table's size per worker, summed
        self.cache_hits = prom.Counter(
            "cnn_cache_hits", "Requests answered from the response cache (RESPONSE_CACHE_MB), or by waiting for an "
            "identical request computing at the same moment: no decode, no inference", model,
        )  # fmt: skip
        self.cache_misses = prom.Counter(
            "cnn_cache_misses", "Requests the response cache did not hold: computed, and kept unless they failed", model
        )
        self.cache_evictions = prom.Counter(
            "cnn_cache_evictions", "Response cache entries dropped, least recently used first, to make room for a "
            "new answer (not those dropped with their unloaded version)", model,
        )  # fmt: skip
        self.cache_bytes = prom.Gauge(
            "cnn_cache_bytes", "What the response cache's answers take, summed over workers (each at most "
            "RESPONSE_CACHE_MB)", [], multiprocess_mode="livesum",
        )  # fmt: skip
        self.cache_entries = prom.Gauge(
            "cnn_cache_entries", "Answers in the response cache, summed over workers", [], multiprocess_mode="livesum"
        )

        self.connections_refused = prom.Counter(
            "cnn_connections_refused", "Connections the HTTP server closed, and gRPC calls the gRPC server refused, "
            "before the app saw a request: reason=connections (MAX_CONNECTIONS), header_bytes (431, MAX_HEADER_BYTES), "
            "header_timeout (408, HEADER_TIMEOUT_S), body_rate (408, MIN_BODY_BYTES_PER_S), body_bytes (413, "
            "MAX_BODY_BYTES, a body arriving faster than the app reads it), body_memory (503, "
            "MAX_BODY_BYTES_IN_FLIGHT), grpc_calls (RESOURCE_EXHAUSTED, GRPC_MAX_CONCURRENT_RPCS), "
            "grpc_message_timeout (DEADLINE_EXCEEDED, a call's message not arrived within REQUEST_TIMEOUT_S)",
            ["reason"],
        )  # fmt: skip
        self.worker_deaths = prom.Counter(
            "cnn_worker_deaths", "Workers that ended without shutting down (SIGKILL, the kernel's OOM killer, a "
            "native crash), counted by the first scrape after BentoML's supervisor reaped them; it starts another in "
            "their place", [],
        )  # fmt: skip
        self.device_oom = prom.Counter(
            "cnn_batch_out_of_memory", "Batches that failed for want of device memory (their requests got 503 and "
            "the model's largest batch was halved)", model,
        )  # fmt: skip

        self._children: dict[tuple[Any, ...], Any] = {}
        for reason in REFUSAL_REASONS:
            self.child(self.connections_refused, reason)

    def seed_version(self, model: str, version: str) -> None:
        """Create a served version's counters at 0, so that every rate and panel over them has data from
        its load on (an alert's ``rate()`` then also sees the first increment)."""
        labels = (model, version)
        for metric in (self.atypical, self.device_oom):
            self.child(metric, *labels)
        for method in EXPLANATION_METHODS:
            self.child(self.explanations, *labels, method)
        for protocol in ("http", "grpc"):
            self.child(self.shed, model, protocol)
            self.child(self.images, *labels, protocol)
            for outcome in ("2xx", "4xx", "5xx"):  # the error ratio is 0, not "No data", before the first error
                self.child(self.requests, *labels, protocol, outcome)
        self.seed_model(model)

    def seed_model(self, model: str) -> None:
        """A model's residency counters at 0: from its first version's load, or on demand from the start, so
        that a model that never loads has them too (its first refusal is then seen by ``increase()``)."""
        for metric in (self.cold_waits, self.budget_exhausted):
            self.child(metric, model)
        for reason in ("pressure", "idle"):
            self.child(self.evictions, model, reason)
        for reason in ("request", "start"):
            self.child(self.model_loads, model, reason)

    def seed_shadow(self, primary: str, candidate: str) -> None:
        """A shadow pair's counters at 0 from the start."""
        for metric in (self.shadow_images, self.shadow_top1_agreements, self.shadow_top5_overlap):
            self.child(metric, primary, candidate)
        for reason in SHADOW_SKIP_REASONS:
            self.child(self.shadow_skipped, primary, candidate, reason)

    def child(self, metric: Any, *values: str) -> Any:
        """``metric.labels(*values)``, kept: on the request path a lookup costs less than prometheus_client's."""
        key = (id(metric), *values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found

    def observe_predictions(self, model: str, version: str, probabilities: Any) -> None:
        """Each image's top-1 probability and normalised entropy (see ``store.quality``)."""
        top1, entropy = confidence_and_entropy(probabilities)
        confidence, spread = self.child(self.confidence, model, version), self.child(self.entropy, model, version)
        for value in top1.tolist():
            confidence.observe(value)
        for value in entropy.tolist():
            spread.observe(value)

    def observe_stage(self, labels: dict[str, Any], stage: str, seconds: float) -> None:
        self.child(self.stage_seconds, labels["model"], labels["version"], stage).observe(seconds)

    @contextlib.contextmanager
    def track_request(
        self, protocol: str, record: RequestRecord | None = None, cut_off: Callable[[], str | None] | None = None
    ) -> Iterator[RequestRecord]:
        """Count one request: in flight while it runs, then its outcome, images and latency.

        A request whose model is not resolved yet counts under ``model=""``, so client-chosen
        names never become label values; the caller fills ``record`` as it learns more. A cancelled
        request counts as ``cut_off()`` says where the service's own time limit cut it off (``5xx``,
        answered 504, or ``4xx`` where its body was still arriving, answered 408), else as nothing
        (None: the client went away).
        """
        record = record or RequestRecord()
        started = time.perf_counter()
        in_flight = self.child(self.in_flight, protocol)
        in_flight.inc()
        outcome = None
        try:
            yield record
            outcome = "2xx"
        except ServiceError as exc:
            outcome = "4xx" if exc.status_code < 500 else "5xx"
            if isinstance(exc, ClientGone) and exc.status_code == 499:  # it went away: no answer was had
                outcome = None
            if isinstance(exc, Overloaded):
                self.child(self.shed, record.model, protocol).inc()
            raise
        except Exception:
            outcome = "5xx"
            raise
        except asyncio.CancelledError:
            outcome = cut_off() if cut_off is not None else None
            raise
        finally:
            in_flight.dec()
            labels = (record.model, record.version, protocol)
            if outcome is not None:
                self.child(self.requests, *labels, outcome).inc()
            if outcome == "2xx":
                self.child(self.images, *labels).inc(record.images)
                self.child(self.request_seconds, *labels).observe(time.perf_counter() - started)


@dataclass
class RequestRecord:
    """What a request has learned about itself, for :meth:`Metrics.track_request`."""

    model: str = ""
    version: str = ""
    images: int = 0
    cache: str | None = None  # RESPONSE_CACHE_MB: "hit" or "miss" (X-Cache, the access log)


@cache
def get_metrics() -> Metrics:
    metrics = Metrics()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # one killed outright cannot: see forget_dead_workers
        atexit.register(withdraw_gauges)
    return metrics


def withdraw_gauges() -> None:
    """This process's live gauges leave ``/metrics``: called as a worker stops (uvicorn ends it by raising the
    SIGTERM it caught again, so no ``atexit`` handler runs on that path) and at any other exit."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        for path in Path(directory).glob(f"gauge_live*_{os.getpid()}.db"):
            path.unlink(missing_ok=True)


def connection_refused(reason: str) -> None:
    """Count a connection the HTTP protocol closed, or a call the gRPC server refused (see :data:`REFUSAL_REASONS`)."""
    metrics = get_metrics()
    metrics.child(metrics.connections_refused, reason).inc()


class ServerProcessCollector:
    """CPU and memory of the whole server: the ``bentoml serve`` process and every worker.

    prometheus_client's own process collector reports the process that answers the scrape,
    which under several workers is a different one each time; this sums the process tree,
    under the same metric names.
    """

    def __init__(self, root_pid: int | None = None) -> None:
        self.root = psutil.Process(root_pid or os.getppid())

    def tree(self) -> list[psutil.Process] | None:
        """The server and its workers now; None where the server's process cannot be read."""
        try:
            return [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return None

    def _processes(self) -> list[psutil.Process]:
        return self.tree() or [psutil.Process()]

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        cpu, rss, vms, fds, count = 0.0, 0, 0, 0, 0
        for process in self._processes():
            try:
                with process.oneshot():
                    times = process.cpu_times()
                    memory = process.memory_info()
                    cpu += times.user + times.system
                    if process is self.root:  # and its children's that ended (a worker killed and reaped): the
                        cpu += times.children_user + times.children_system  # counter never goes down
                    rss, vms, fds, count = rss + memory.rss, vms + memory.vms, fds + process.num_fds(), count + 1
            except psutil.Error:  # a worker that exited between listing and reading
                continue
        yield CounterMetricFamily("process_cpu_seconds", "User and system CPU time of the server's processes", cpu)
        yield GaugeMetricFamily("process_resident_memory_bytes", "Resident memory of the server's processes", rss)
        yield GaugeMetricFamily("process_virtual_memory_bytes", "Virtual memory of the server's processes", vms)
        yield GaugeMetricFamily("process_open_fds", "Open file descriptors of the server's processes", fds)
        yield GaugeMetricFamily("cnn_server_processes", "Processes of the server (the arbiter and its workers)", count)
        yield GaugeMetricFamily("process_start_time_seconds", "Start time of the server", self.root.create_time())


class ModelStateCollector:
    """``cnn_model_ready``, ``cnn_model_info`` and ``cnn_model_load_seconds`` from every worker's published state.

    Not multiprocess gauges: prometheus_client cannot remove a series in multiprocess mode,
    and a version that was unloaded must disappear rather than read 0 (not ready) for ever.
    A version is ready (1) only when it is ready in every worker.
    """

    def __init__(self, states: Callable[[], Iterable[dict[str, Any]]]) -> None:
        self.states = states

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        ready: dict[tuple[str, str], float] = {}
        files: dict[tuple[str, str], float] = {}
        info: dict[tuple[str, str, str], float] = {}
        load: dict[tuple[str, str, str], float] = {}
        for state in self.states():
            for model, versions in state.get("models", {}).items():
                for version, entry in versions.items():
                    key = (model, version)
                    ready[key] = min(ready.get(key, 1.0), 1.0 if entry.get("status") == "ready" else 0.0)
                    if entry.get("status") == "ready":
                        files[key] = max(files.get(key, 0.0), 1.0 if entry.get("files_problem") else 0.0)
                    if entry.get("provider"):
                        info[(*key, entry["provider"])] = 1.0
                    for phase in ("load", "warmup"):
                        if f"{phase}_seconds" in entry:
                            load[(*key, phase)] = max(load.get((*key, phase), 0.0), entry[f"{phase}_seconds"])
        families: list[tuple[str, str, list[str], dict[Any, float]]] = [
            ("cnn_model_ready", "1 when the version serves in every worker, 0 while loading, draining or failed",
             ["model", "version"], ready),
            ("cnn_model_info", "1 per served version, with the execution provider it runs on",
             ["model", "version", "provider"], info),
            ("cnn_model_files_changed", "1 when a served version's files on disk no longer match what it loaded and "
             "verified (it keeps serving what it loaded; GET /models names the problem), else 0",
             ["model", "version"], files),
            ("cnn_model_load_seconds", "Time to load (phase=load) and warm up (phase=warmup) a version",
             ["model", "version", "phase"], load),
        ]  # fmt: skip
        for name, documentation, labels, values in families:
            family = GaugeMetricFamily(name, documentation, labels=labels)
            for key, value in sorted(values.items()):
                family.add_metric(list(key), value)
            yield family


def exposition(states: Callable[[], Iterable[dict[str, Any]]], server_pid: int | None = None) -> Callable[[], bytes]:
    """``/metrics``: every worker's samples, the server's processes and every worker's model states.

    ``states`` gives each worker's published state (see :class:`ModelStateCollector`); ``server_pid``
    is the ``bentoml serve`` process whose tree is summed (this process's parent where not given).
    """
    from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry(auto_describe=False)
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        MultiProcessCollector(registry)
    else:  # outside BentoML's server: this process's own samples
        registry.register(_Samples(REGISTRY))
    server = ServerProcessCollector(server_pid)
    registry.register(server)
    registry.register(ModelStateCollector(states))

    def alive() -> set[int] | None:
        tree = server.tree()
        return None if tree is None else {process.pid for process in tree} | {os.getpid()}

    def render() -> bytes:
        if directory and (dead := forget_dead_workers(Path(directory), alive)):
            get_metrics().worker_deaths.inc(len(dead))
        return generate_latest(registry)

    return render


def forget_dead_workers(directory: Path, alive: Callable[[], set[int] | None]) -> list[int]:
    """Remove the live gauges (``livesum``, ``livemax``, ...) of processes that are not among ``alive()`` and no
    longer run at all; the pids whose ``livesum`` file this call removed (every worker writes one as it starts:
    its budget and cache gauges), so that workers scraped at the same moment name each dead one once between
    them. ``alive`` is read after the files are listed, so a worker that starts in between cannot lose its own;
    where it gives None (who lives cannot be told) nothing is removed. A process that still runs keeps its
    files whoever it is (another server sharing ``BENTOML_HOME``): removed under it, its gauges would be lost
    until it exits, as prometheus_client keeps writing to the open file.

    prometheus_client keeps each process's samples in files named by its pid and leaves removing a dead
    one's live gauges to the application (``mark_process_dead``): a worker that ends by itself removes its own
    (:func:`withdraw_gauges`). A worker killed outright (SIGKILL, the kernel's OOM killer) runs nothing on its way
    out, and BentoML's supervisor starts another: without this its in-flight requests, resident bytes and budget
    share would be added to its successor's for as long as the server runs. Its counters and histograms stay,
    as prometheus_client means them to: they count what it did. prometheus_client's collector tolerates a live
    gauge's file removed while it reads.
    """
    files = list(directory.glob("gauge_live*_*.db"))
    living = alive() if files else None
    if living is None:
        return []
    forgotten: set[int] = set()
    for path in files:
        owner = path.stem.rpartition("_")[2]
        if not owner.isdigit() or int(owner) in living or psutil.pid_exists(int(owner)):
            continue
        with contextlib.suppress(FileNotFoundError):  # another worker answering a scrape removed it first
            path.unlink()
            if path.name.startswith("gauge_livesum_"):
                forgotten.add(int(owner))
    for pid in sorted(forgotten):
        logger.warning("worker %d ended without shutting down (killed outright?): its gauges leave /metrics", pid)
    return sorted(forgotten)


class _Samples:
    """Another registry's samples, without its process collector (ours covers every process)."""

    def __init__(self, registry: Any) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Any]:
        for family in self.registry.collect():
            if not family.name.startswith(("process_", "python_")):
                yield family
