"""Every knob of the service, read once from the environment and validated at start-up."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .memory import parse_size
from .store.host import cpu_count


class Settings(BaseSettings):
    """Environment variables, by their upper-case names (``HTTP_PORT=3100``)."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    http_host: str = Field("0.0.0.0", description="Address the HTTP and gRPC servers bind.")
    http_port: int = Field(3000, ge=1, le=65535, description="HTTP port: /classify, /models, health, metrics.")
    grpc_port: int = Field(8001, ge=1, le=65535, description="gRPC port: the Open Inference Protocol (KServe v2).")
    model_store: Path = Field(Path("model_store"), description="The model store written by `make export`.")
    models: str = Field(
        "", description="Comma-separated models to load, `name` or `name:version`; empty = every model in the store."
    )
    model_control: Literal["none", "poll", "explicit", "on-demand"] = Field(
        "none",
        description="none: load at start only; poll: follow the store every POLL_INTERVAL_S; "
        "explicit: change only on /v2/repository load and unload calls; on-demand: any model of the store, loaded "
        "by the first request that names it and evicted, least recently used first, to stay within MEMORY_BUDGET.",
    )
    pinned: str = Field(
        "", description="MODEL_CONTROL=on-demand: models loaded at start and never evicted (comma-separated)."
    )
    memory_budget: str = Field(
        "",
        description="MODEL_CONTROL=on-demand: memory the models of the whole server may take (bytes, or 4GiB, "
        "512MiB); empty = the cgroup memory limit (else the machine's) less 10% and the server's baseline.",
    )
    cold_start_timeout_s: float = Field(
        60.0, gt=0, description="MODEL_CONTROL=on-demand: how long a request waits for its model to load (then 503)."
    )
    idle_unload_s: float = Field(
        0.0, ge=0, description="MODEL_CONTROL=on-demand: unload a model unused this long (0 = only under pressure)."
    )
    poll_interval_s: float = Field(
        5.0,
        gt=0,
        le=3600,
        description="How often MODEL_CONTROL=poll re-reads the store (explicit reads its state file twice a second).",
    )
    model_control_state: Path | None = Field(
        None,
        description="MODEL_CONTROL=explicit's declared models, shared by every worker and replica; "
        "empty = MODEL_STORE/.model-control.json.",
    )
    admin_token: SecretStr | None = Field(
        None, description="When set, /v2/repository (HTTP and gRPC) needs `Authorization: Bearer <ADMIN_TOKEN>`."
    )
    default_model: str = Field(
        "", description="Model for requests without ?model=; empty = resnet50 if loaded, else the first."
    )
    providers: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="auto: CUDA where a GPU really works, else CPU; cuda: fail a model that cannot use CUDA."
    )
    workers: int = Field(
        0,
        ge=0,
        description="BentoML worker processes, each loading every model; 0 = one per CPU when every model "
        "served is under 0.1 GFLOPs per image (LeNet-5: the HTTP stack is the cost), else 1; where those run on "
        "CUDA, one per 4 CPUs (at most 8), feeding one session host.",
    )
    instances: str = Field(
        "1",
        description="ONNX Runtime sessions per model, fed by one batcher (Triton's instance_group count): "
        "`N` for every model, or `name:N,...` (others 1), each N from 1 to 64.",
    )
    intra_op_threads: int = Field(
        0,
        ge=0,
        description="ONNX Runtime threads per session; 0 = CPUs (affinity, cgroup quota) / workers / instances "
        "(CPUs / instances where a session host holds every worker's sessions).",
    )
    inter_op_threads: int = Field(1, ge=1, description="ONNX Runtime inter-op threads (sequential execution).")
    ort_spinning: bool = Field(False, description="Let ONNX Runtime threads spin when idle (steals CPU from decoding).")
    ort_cpu_arena: bool = Field(
        True, description="ONNX Runtime's CPU memory arena: faster allocation, memory kept at its peak."
    )
    inline_decode_bytes: int = Field(
        16384,
        ge=0,
        description="A request whose images total up to this many bytes (each of at most 512 x 512 pixels) "
        "decodes on the event loop, skipping the thread pool's hops; where the models run on CUDA, 0 unless set "
        "(the event loop is then the worker's bottleneck).",
    )
    decode_threads: int = Field(
        0,
        ge=0,
        description="Threads decoding images per worker; 0 = half the CPUs (affinity, cgroup quota) / workers, "
        "at least 1: decoders take cores from ONNX Runtime's threads.",
    )
    max_batch_size: int = Field(
        32,
        ge=1,
        le=1024,
        description="Most images per ONNX Runtime call on this machine; a model whose config.pbtxt names a lower "
        "`max_batch_size` (which Triton reads too) batches up to that.",
    )
    batch_sizes: str = Field(
        "auto",
        description="The batch shapes a session runs: a batch is padded up to the next one and the padding dropped "
        "from the answers, and each is warmed before /readyz says ready, so no live request meets a new shape. "
        "`auto`: powers of two up to the model's largest batch on CUDA (a new shape costs cuDNN an algorithm search), "
        "any size on the CPU (where padding only costs); `pow2`; `any`; or sizes from 1 to 1024, `1,8,32` (1 and "
        "the largest batch are added, sizes above it left out: an out-of-memory batch halves the largest down to a "
        "warmed shape).",
    )
    cuda_conv_algo_search: Literal["HEURISTIC", "EXHAUSTIVE", "DEFAULT"] = Field(
        "HEURISTIC",
        description="cuDNN's convolution algorithm search on CUDA, per shape. HEURISTIC: measured 0.21 s (FP16) per "
        "new shape against EXHAUSTIVE's 1.23 s, with the same steady throughput (ResNet-50, one H200).",
    )
    cuda_prefer_nhwc: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Run convolutions in NHWC on CUDA: auto = on for FP16 graphs (ResNet-50 FP16, batch 256: "
        "9,343 against 7,551 images/s on one H200), off for FP32 (not measured faster).",
    )
    cuda_tf32: bool = Field(
        True,
        description="Let FP32 matrix products and convolutions use TF32 tensor cores on CUDA (about 2x ResNet-50 FP32 "
        "on one H200; 10-bit mantissa inside the products).",
    )
    cuda_graphs: Literal["off", "on"] = Field(
        "off",
        description="Capture one CUDA graph per batch shape on CUDA and replay it (ONNX Runtime's "
        "`enable_cuda_graph`): each shape runs on fixed device buffers, copied in once and out once. Needs fixed "
        "shapes (`BATCH_SIZES` not `any`) and every node of the graph on CUDA; off until a GPU run measures it faster.",
    )
    session_host: Literal["auto", "worker", "shared"] = Field(
        "auto",
        description="Where the ONNX Runtime sessions live. `worker`: each worker opens its own. `shared`: one process "
        "(the session host) opens each once and every worker sends it its batches through shared memory, so a GPU "
        "holds one CUDA context and one copy of each model however many `WORKERS` feed it. `auto`: shared where "
        "the models run on CUDA and more than one worker serves.",
    )
    max_batch_delay_ms: float = Field(
        2.0,
        ge=0,
        le=1000,
        description="How long a batch waits for requests already accepted and still decoding, once a session is "
        "free; a lone request never waits.",
    )
    max_queue_images: int = Field(
        512,
        ge=1,
        description="Images waiting per model beyond which requests get 503 (a request of more images than that: 413).",
    )
    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1024, description="Largest request body accepted (413 above).")
    max_header_bytes: int = Field(
        16 * 1024, ge=1024, description="Largest request line and headers together (431 above, connection closed)."
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Longest a connection may take to send a request's head (408 above, closed), and a gRPC health "
        "call its message and answer (DEADLINE_EXCEEDED).",
    )
    min_body_bytes_per_s: int = Field(
        1024, ge=0, description="Slowest a body may arrive, over each 5 s (408 below, closed); 0 turns it off."
    )
    max_connections: int = Field(
        1024, ge=1, description="Connections one worker holds; one more gets 503 with Retry-After and is closed."
    )
    max_body_bytes_in_flight: int = Field(
        128 * 1024 * 1024,
        ge=1024,
        description="Request body bytes one worker holds at once, each request's from its head (its Content-Length) "
        "to the end of its answer; a request that would pass it gets 503 with Retry-After and is closed (one alone "
        "is always taken). Bounds the memory large uploads take together (each body is copied as it is parsed).",
    )
    grpc_max_concurrent_rpcs: int = Field(
        1024,
        ge=1,
        description="gRPC calls one worker holds at once; one more is answered RESOURCE_EXHAUSTED before its "
        "message is read (the gRPC port's MAX_CONNECTIONS). The health calls (ServerLive, ServerReady, "
        "grpc.health.v1.Health) have 32 places of their own beside these, then take a spare one of these.",
    )
    grpc_max_connection_age_s: float = Field(
        300.0,
        ge=0,
        description="Ask a gRPC client to reconnect after about this long on one connection (GOAWAY, gRPC's +-10% "
        "jitter; its calls finish first, for up to REQUEST_TIMEOUT_S), so that a layer-4 balancer such as a "
        "Kubernetes Service spreads long-lived clients over replicas added since; 0 = never.",
    )
    max_image_pixels: int = Field(
        64_000_000, ge=1, description="Largest decoded image, width x height, checked before decoding (413 above)."
    )
    max_images_per_request: int = Field(64, ge=1, description="Most files in one multipart request (413 above).")
    max_top_k: int = Field(1000, ge=1, description="Largest top_k accepted (400 above).")
    request_timeout_s: float = Field(
        60.0,
        gt=0,
        description="Longest a request may take before the server gives up: an HTTP request from its head, a gRPC call "
        "from its start, the body's or message's arrival included (504 or 408; DEADLINE_EXCEEDED).",
    )
    enable_noop: bool = Field(
        False, description="Serve POST /noop (reads the body, answers a fixed JSON): the HTTP stack's own ceiling."
    )
    api_token: SecretStr | None = Field(
        None,
        description="When set, /classify, /explain, /models, /v2 (HTTP and gRPC) and /noop need "
        "`Authorization: Bearer <token>`; /v2/health/* and gRPC's ServerLive, ServerReady and grpc.health.v1.Health "
        "stay open to probes.",
    )
    jpeg_draft: bool = Field(True, description="Let libjpeg decode large JPEGs at a reduced scale (DCT scaling).")
    access_log: Literal["off", "json"] = Field(
        "off", description="json: one JSON line per HTTP request on standard output (id, model, status, latency)."
    )
    tracing: Literal["off", "otlp"] = Field(
        "off", description="otlp: OpenTelemetry spans (request, decode, queue, infer, postprocess) to OTLP_ENDPOINT."
    )
    otlp_endpoint: str = Field(
        "http://127.0.0.1:4318/v1/traces", description="Where TRACING=otlp sends spans (OTLP over HTTP, protobuf)."
    )
    trace_sample_ratio: float = Field(
        1.0, ge=0, le=1, description="Share of new traces TRACING=otlp records; a caller's sampled flag wins."
    )
    drift_window: int = Field(
        500, ge=10, le=1_000_000,
        description="Latest answers per model version (and worker) that drift from the baseline is measured over.",
    )  # fmt: skip
    baseline_requests: int = Field(
        500, ge=0,
        description="Where a version's export recorded no baseline, learn one from its first N answers; 0 = none.",
    )  # fmt: skip
    shadow: str = Field(
        "",
        description="PRIMARY:CANDIDATE:FRACTION, comma-separated, each model NAME or NAME@VERSION: that fraction of "
        "the primary's requests also runs, already decoded, through the candidate off the request path, compared "
        "live (cnn_shadow_*, GET /models).",
    )
    shadow_queue: int = Field(
        64, ge=1, le=100_000, description="Shadow requests waiting per pair; more are dropped (and counted)."
    )
    canary: str = Field(
        "",
        description="PRIMARY:CANDIDATE:FRACTION, comma-separated, each model NAME or NAME@VERSION: that fraction of "
        "the requests for PRIMARY that name no version is answered by CANDIDATE, judged window by window against the "
        "primary, rolled back or stepped up by itself (GET /models, cnn_canary_*).",
    )
    canary_steps: str = Field(
        "",
        description="Fractions a canary steps up to after each passing window, e.g. 0.05,0.25,0.5,1.0; past the last "
        "it is promoted. Empty: the fraction stays (a failing window still rolls it back).",
    )
    canary_window: int = Field(
        100, ge=10, le=1_000_000, description="Canary answers per analysis window (in each worker)."
    )
    canary_sample: float = Field(
        1.0, gt=0, le=1,
        description="Share of a canary's answers also run through the primary off the request path (the shadow "
        "queue), for top-1 agreement.",
    )  # fmt: skip
    canary_min_agreement: float | None = Field(
        None, gt=0, le=1,
        description="Top-1 agreement with the primary a canary must not be shown to fall below (99% confidence); "
        "unset: the candidate's export gate, else 0.99.",
    )  # fmt: skip
    canary_max_error_increase: float = Field(
        0.01, ge=0, le=1, description="How much higher than the primary's a canary's server-error rate may be."
    )
    canary_max_latency_ratio: float = Field(
        1.5,
        ge=1,
        description="A canary's p50 and p99 may be at most this times the primary's (plus the slack); a window fails "
        "where more than half (p50) or 1% (p99) of its answers are slower than that, at 99% confidence.",
    )
    canary_latency_slack_ms: float = Field(
        2.0, ge=0, description="Milliseconds a canary's p50 and p99 may exceed the ratio by (timer noise)."
    )
    canary_max_drift: float = Field(
        0.1, gt=0, le=1,
        description="Largest Jensen-Shannon divergence between the two sides' top-1 confidence distributions.",
    )  # fmt: skip
    canary_state: Path | None = Field(
        None,
        description="The JSON file every worker and replica shares the canaries' state through (default: "
        ".canary.json beside MODEL_CONTROL_STATE's file).",
    )
    response_cache_mb: float = Field(
        0, ge=0,
        description="Memory each worker's response cache may take, in MiB (0 = off): an identical request (the same "
        "image bytes, model, version and parameters) is answered from it with `X-Cache: hit`, without decoding or "
        "inference; least recently used answers go first, and an unloaded version's go with it.",
    )  # fmt: skip
    warmup_batches: Annotated[tuple[int, ...], NoDecode] = Field(
        (),
        description="Batch sizes each model runs once before /readyz says ready, e.g. 1,8,32 (none above its "
        "largest batch); empty = 1 and the model's largest batch (MAX_BATCH_SIZE, or its config.pbtxt's lower "
        "max_batch_size).",
    )

    @field_validator("model_control_state", "canary_state", "api_token", "admin_token", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        """``MODEL_CONTROL_STATE=`` means its default, as its description says (not the current folder); a token read
        from a secret file loses its trailing newline (which would make every request 401), and an empty one is none."""
        if isinstance(value, str):
            value = value.strip()
            return value or None
        return value

    @field_validator("warmup_batches", mode="before")
    @classmethod
    def _warmup_batches(cls, value: Any) -> Any:
        """``1,8`` as written in an environment (or ``[1, 8]``); empty = the default."""
        if isinstance(value, str):
            text = value.strip().removeprefix("[").removesuffix("]")
            try:
                return tuple(int(part) for part in text.split(",") if part.strip())
            except ValueError:
                raise ValueError(f"WARMUP_BATCHES {value!r}: use batch sizes, e.g. 1,8,32") from None
        return value

    @field_validator("warmup_batches")
    @classmethod
    def _warmup_batches_positive(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(size < 1 for size in value):
            raise ValueError(f"WARMUP_BATCHES {list(value)}: every batch size must be at least 1")
        return value

    @model_validator(mode="after")
    def _ports_differ(self) -> Settings:
        if self.http_port == self.grpc_port:
            port = self.http_port
            raise ValueError(f"HTTP_PORT and GRPC_PORT are both {port}: give each its own (defaults 3000 and 8001)")
        return self

    @field_validator("models", "instances")
    @classmethod
    def _strip(cls, value: str) -> str:
        return ",".join(part.strip() for part in value.split(",") if part.strip())

    @field_validator("instances")
    @classmethod
    def _instances(cls, value: str) -> str:
        for part in value.split(","):
            count = part.rpartition(":")[2]
            if not count.isdigit() or not 1 <= int(count) <= 64:
                raise ValueError(f"INSTANCES entry {part!r}: use N or name:N with N from 1 to 64")
        return value

    @field_validator("shadow")
    @classmethod
    def _shadow(cls, value: str) -> str:
        value = ",".join(part.strip() for part in value.split(",") if part.strip())
        for part in filter(None, value.split(",")):
            shadow_pair(part)  # raises ValueError with what is wrong
        return value

    def shadow_pairs(self) -> list[ShadowPair]:
        return [shadow_pair(part) for part in filter(None, self.shadow.split(","))]

    @field_validator("canary")
    @classmethod
    def _canary(cls, value: str) -> str:
        value = ",".join(part.strip() for part in value.split(",") if part.strip())
        primaries = [shadow_pair(part, "CANARY").primary.name for part in filter(None, value.split(","))]
        if len(set(primaries)) != len(primaries):
            raise ValueError(f"CANARY {value!r}: one canary per primary model")
        return value

    @field_validator("canary_steps")
    @classmethod
    def _canary_steps(cls, value: str) -> str:
        try:
            steps = [float(part) for part in value.split(",") if part.strip()]
        except ValueError:
            raise ValueError(f"CANARY_STEPS {value!r}: use increasing fractions, e.g. 0.05,0.25,0.5,1.0") from None
        if any(not 0 < s <= 1 for s in steps) or steps != sorted(set(steps)):
            raise ValueError(f"CANARY_STEPS {value!r}: fractions must increase, each above 0 and at most 1")
        return ",".join(f"{s:g}" for s in steps)

    def canary_pairs(self) -> list[ShadowPair]:
        return [shadow_pair(part, "CANARY") for part in filter(None, self.canary.split(","))]

    @property
    def canary_step_fractions(self) -> tuple[float, ...]:
        return tuple(float(part) for part in self.canary_steps.split(",") if part)

    @property
    def canary_state_path(self) -> Path:
        return self.canary_state or self.control_state_path.with_name(".canary.json")

    def instance_counts(self) -> dict[str, int]:
        """``INSTANCES`` as {name: N}: each model's first ``name:N`` entry, and the last bare ``N`` under ``""``."""
        counts: dict[str, int] = {}
        for part in self.instances.split(","):
            name, _, count = part.rpartition(":")
            if not name or name not in counts:
                counts[name] = int(count)
        return counts

    def instances_for(self, model: str) -> int:
        """``INSTANCES`` for one model: its own ``name:N`` entry, else a bare ``N``, else 1."""
        counts = self.instance_counts()
        return counts.get(model, counts.get("", 1))

    def listed_models(self) -> dict[str, int | None]:
        """``MODELS`` as written, {name: pinned version or None}."""
        listed: dict[str, int | None] = {}
        for part in filter(None, self.models.split(",")):
            name, _, version = part.partition(":")
            if version and not version.isdigit():
                raise ValueError(f"MODELS entry {part!r}: the version after ':' must be a positive integer")
            listed[name] = int(version) if version else None
        return listed

    def requested_models(self) -> dict[str, int | None]:
        """``MODELS`` as {name: pinned version or None}, with the models of its shadows and canaries; empty = all in
        the store."""
        requested = self.listed_models()
        if requested:  # a shadow's and a canary's models are served too
            for pair in self.shadow_pairs() + self.canary_pairs():
                requested.setdefault(pair.primary.name, None)
                requested.setdefault(pair.candidate.name, None)
        return requested

    def pinned_models(self) -> list[str]:
        return [name.strip() for name in self.pinned.split(",") if name.strip()]

    @field_validator("batch_sizes")
    @classmethod
    def _batch_sizes(cls, value: str) -> str:
        value = value.strip().lower()
        if value in ("auto", "pow2", "any"):
            return value
        parts = [part.strip() for part in value.split(",") if part.strip()]
        if not parts or not all(part.isdigit() and 1 <= int(part) <= 1024 for part in parts):
            raise ValueError(f"BATCH_SIZES={value!r}: use auto, pow2, any, or sizes from 1 to 1024 such as 1,8,32")
        return ",".join(str(size) for size in sorted({int(part) for part in parts}))

    @model_validator(mode="after")
    def _batch_sizes_fit(self) -> Settings:
        if self.batch_sizes not in ("auto", "pow2", "any"):
            above = [size for size in map(int, self.batch_sizes.split(",")) if size > self.max_batch_size]
            if above:
                raise ValueError(f"BATCH_SIZES has {above} above MAX_BATCH_SIZE={self.max_batch_size}: lower them")
        return self

    def batch_limit(self, configured: int | None) -> int:
        """A model's most images per call: ``MAX_BATCH_SIZE``, or ``configured`` (its config.pbtxt's
        ``max_batch_size``) where that is lower."""
        return min(self.max_batch_size, configured or self.max_batch_size)

    def batch_shapes(self, provider: str, limit: int) -> tuple[int, ...] | None:
        """The batch sizes a session on ``provider`` runs with batches of at most ``limit`` images, ascending and
        ending at ``limit``; None: any size."""
        choice = self.batch_sizes
        if choice == "any" or (choice == "auto" and provider != "CUDAExecutionProvider"):
            return None
        if choice in ("auto", "pow2"):
            sizes = {1 << n for n in range(limit.bit_length()) if 1 << n <= limit}
        else:
            sizes = {size for size in map(int, choice.split(",")) if size <= limit}
        return tuple(sorted(sizes | {1, limit}))  # 1: a batch an out-of-memory failure shrinks always has a shape

    @field_validator("memory_budget")
    @classmethod
    def _a_size(cls, value: str) -> str:
        if value.strip():
            parse_size(value)
        return value

    def warmup(self, limit: int) -> tuple[int, ...]:
        """The batches a model whose batches are at most ``limit`` images runs before it serves: warming up at the
        largest makes ONNX Runtime's memory reach its peak before the first request."""
        return tuple(sorted({min(size, limit) for size in self.warmup_batches})) or (1, limit)

    @property
    def processes(self) -> int:
        """Worker processes: ``WORKERS``, or 1 where it is still 0 (outside the server, see runtime.sizing)."""
        return self.workers or 1

    def session_threads(self, instances: int = 1, *, shared: bool = False) -> int:
        """Threads of one session: the worker's share of the CPUs (all of them for the one process holding every
        worker's sessions, ``shared``), split between the model's instances."""
        return self.intra_op_threads or max(1, cpu_count() // ((1 if shared else self.processes) * instances))

    @property
    def control_state_path(self) -> Path:
        return self.model_control_state or self.model_store / ".model-control.json"

    @property
    def decoder_threads(self) -> int:
        return self.decode_threads or max(1, cpu_count() // (2 * self.processes))


@cache
def get_settings() -> Settings:
    return Settings()


def setting_problems(error: ValidationError) -> list[str]:
    """Settings that failed validation, one line each as the environment names them (``MAX_BATCH_SIZE=abc: Input
    should be a valid integer ...``), a secret's value never shown; a check across settings gives its own line."""
    lines = []
    for problem in error.errors():
        message = problem["msg"].removeprefix("Value error, ")
        if not problem["loc"]:  # a model validator: its message names the settings
            lines.append(message)
            continue
        name = str(problem["loc"][0])
        field = Settings.model_fields.get(name)
        secret = field is not None and SecretStr in (field.annotation, *get_args(field.annotation))
        value = "(hidden)" if secret else str(problem.get("input"))
        lines.append(message if message.startswith(name.upper()) else f"{name.upper()}={value}: {message}")
    return lines


@dataclass(frozen=True)
class ShadowTarget:
    name: str
    version: int | None = None  # None: the version a request without ?version= gets

    def __str__(self) -> str:
        return self.name if self.version is None else f"{self.name}@{self.version}"


@dataclass(frozen=True)
class ShadowPair:
    primary: ShadowTarget
    candidate: ShadowTarget
    fraction: float

    def __str__(self) -> str:
        return f"{self.primary}:{self.candidate}:{self.fraction:g}"


def shadow_pair(text: str, setting: str = "SHADOW") -> ShadowPair:
    """One ``SHADOW`` (or ``CANARY``) entry, ``PRIMARY:CANDIDATE:FRACTION``, each model ``NAME`` or ``NAME@VERSION``."""
    parts = text.split(":")
    example = "resnet50:resnet50_int8:0.2, lenet5@3:lenet5@2:1"
    usage = f"{setting} entry {text!r}: use PRIMARY:CANDIDATE:FRACTION (e.g. {example})"
    if len(parts) != 3:
        raise ValueError(usage)

    def target(part: str) -> ShadowTarget:
        name, _, version = part.strip().partition("@")
        if not name or (version and not (version.isdigit() and int(version) >= 1)):
            raise ValueError(usage)
        return ShadowTarget(name, int(version) if version else None)

    try:
        fraction = float(parts[2])
    except ValueError:
        raise ValueError(usage) from None
    if not 0 < fraction <= 1:
        raise ValueError(f"{setting} entry {text!r}: the fraction must be above 0 and at most 1")
    primary, candidate = target(parts[0]), target(parts[1])
    if primary == candidate:
        raise ValueError(f"{setting} entry {text!r}: a model cannot be compared with itself")
    return ShadowPair(primary, candidate, fraction)
