"""What one GPU benchmark measures, and for how long: the defaults for a GPU, and for the CPU dry run.

On ``cuda`` the plan is meant to fit one command of 600 s on one H100 or H200 with 16 cores (about 485 s by the
stages' estimates with the exports and the WORKERS=4 server skipped as served already, the CUDA_GRAPHS=on trials
included, last among the servers; not yet timed on a GPU;
``budget`` stops starting stages past 540 s); on ``cpu`` it is the dry
run CI makes on two cores (about a minute): the same stages on LeNet-5 and ResNet-50 FP32 with short runs, to keep
the code from rotting.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# ONNX Runtime's own CUDA options (an exhaustive cuDNN search, NCHW kernels), measured beside the service's
# (service/runtime/cuda.py: provider_options) for the FP16 graph, so a run shows what the service's choice is worth
ORT_DEFAULTS: dict[str, str] = {}
FAMILIES = ("resnet50_fp16", "resnet50", "lenet5")


@dataclass(frozen=True)
class Server:
    """One service started for some runs: its model, ``WORKERS`` (0: the service's own sizing) and its runs."""

    model: str
    workers: int
    http: tuple[int, ...]  # concurrency levels of POST /classify
    grpc: tuple[int, ...] = ()  # of gRPC ModelInfer with uint8 pixels
    sweep: bool = False  # the every-batch-size run, first, on the fresh server
    settings: tuple[tuple[str, str], ...] = ()  # beside the service's defaults (a trial, never read by a target)

    @property
    def label(self) -> str:
        return " ".join([f"{self.model} WORKERS={self.workers}", *(f"{k}={v}" for k, v in self.settings)])


@dataclass(frozen=True)
class Ceiling:
    """One in-process ceiling: a model with a set of CUDA provider options (``service``: the service's own)."""

    model: str
    options_label: str
    options: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Plan:
    providers: str
    models: tuple[str, ...]
    batches: tuple[int, ...]  # in-process
    concurrency: tuple[int, ...]  # served
    max_batch: int  # the service's MAX_BATCH_SIZE
    seconds: float  # per served run, after its warm-up
    warmup: float
    ceiling_seconds: float  # per batch size and path
    anchor_batches: tuple[int, ...]
    scaling_workers: tuple[int, ...]
    scaling_concurrency: int
    sweep_repeats: int  # requests per size in the every-batch-size run
    sweep_seconds: float  # its bound
    load_processes: int
    budget: float  # seconds from the start after which no stage starts
    start_timeout: float  # a server's, to /readyz

    @classmethod
    def make(cls, providers: str, cores: int, **overrides: Any) -> Plan:
        given = {k: v for k, v in overrides.items() if v is not None}
        processes = max(2, min(4, cores // 4))
        if providers == "cuda":
            plan = cls(providers="cuda", models=FAMILIES, batches=(1, 8, 32, 64, 128, 256), concurrency=(32, 128, 256),
                       max_batch=64, seconds=5.0, warmup=1.0, ceiling_seconds=1.0, anchor_batches=(256, 64),
                       scaling_workers=(1, 2, 4), scaling_concurrency=128, sweep_repeats=5, sweep_seconds=45.0,
                       load_processes=processes, budget=540.0, start_timeout=150.0)  # fmt: skip
        else:  # LeNet-5's batches are cheap: the every-batch-size run and the WORKERS counts on it
            plan = cls(providers="cpu", models=("lenet5", "resnet50"), batches=(1, 8), concurrency=(8, 16),
                       max_batch=8, seconds=2.0, warmup=0.5, ceiling_seconds=0.5, anchor_batches=(),
                       scaling_workers=(1, 2), scaling_concurrency=16, sweep_repeats=3, sweep_seconds=20.0,
                       load_processes=processes, budget=300.0, start_timeout=120.0)  # fmt: skip
        return dataclasses.replace(plan, **given)

    def check(self) -> None:
        if not self.models:
            raise ValueError(f"--models names none: choose among {', '.join(FAMILIES)}")
        unknown = [m for m in self.models if m not in FAMILIES]
        if unknown:
            raise ValueError(f"models {unknown}: choose among {', '.join(FAMILIES)}")
        for option, value in (("--max-batch", self.max_batch), ("--load-processes", self.load_processes)):
            if value < 1:  # the lists and the seconds are checked as the command line is read (arguments.py)
                raise ValueError(f"{option} takes a whole number of 1 or more")
        if not self.warmup >= 0:
            raise ValueError("--warmup takes a number of seconds, 0 or more")
        if self.providers == "cpu" and any(m.endswith("_fp16") for m in self.models):
            raise ValueError("an FP16 variant is served on CUDA only (the service refuses it on CPUs): drop it")

    @property
    def resnet50(self) -> str | None:
        """The plan's first ResNet-50: served over gRPC (its target's), and where CUDA_GRAPHS=on is tried, in-process
        and (on a GPU) served."""
        return self._pick(("resnet50_fp16", "resnet50"))

    @property
    def graph_batches(self) -> tuple[int, ...]:
        """Where its in-process ceiling times CUDA_GRAPHS=on too: the service's batch shapes among its sizes."""
        return tuple(b for b in self.batches if b <= self.max_batch)

    @property
    def dry_run(self) -> bool:
        return self.providers == "cpu"

    def _pick(self, order: tuple[str, ...]) -> str | None:
        return next((m for m in order if m in self.models), None)

    @property
    def sweep_model(self) -> str | None:
        """The every-batch-size run's model: the FP16 ResNet-50 on a GPU, LeNet-5 in the dry run (cheap batches)."""
        return self._pick(("lenet5", "resnet50") if self.dry_run else FAMILIES)

    @property
    def scaling_model(self) -> str | None:
        """The model served with each of ``scaling_workers``."""
        return self._pick(("lenet5", "resnet50") if self.dry_run else FAMILIES)

    def ceilings(self) -> list[Ceiling]:
        """Every model with the service's options; the FP16 graph with ONNX Runtime's defaults as well."""
        found = []
        for model in self.models:
            found.append(Ceiling(model, "service"))
            if model.endswith("_fp16"):
                found.append(Ceiling(model, "onnxruntime-defaults", tuple(ORT_DEFAULTS.items())))
        return found

    def servers(self) -> list[Server]:
        """One service per model with the service's own WORKERS sizing (``WORKERS=0``: what a user gets), the
        scaling model's followed by it with each of ``scaling_workers`` (the run skips a count the sizing already
        served, with the same settings otherwise: on 16 cores the ResNets' 0 is 4), so that a budget spent leaves
        out a whole target's servers last, not the scaling target's. gRPC on the first ResNet-50 (its target's);
        on a GPU the models after the first are served at the scaling level and above only (what their targets
        read), for the budget, and the first ResNet-50 once more with CUDA_GRAPHS=on, last."""
        found: list[Server] = []
        for model in self.models:
            http = self.concurrency
            if model == self.scaling_model:  # its sizing's count is one the scaling target reads
                http = tuple(sorted({*http, self.scaling_concurrency}))
            elif not self.dry_run and model != self.models[0]:
                http = tuple(c for c in http if c >= self.scaling_concurrency) or http
            grpc = self.concurrency if model == self.resnet50 else ()
            found.append(Server(model, 0, http, grpc, sweep=model == self.sweep_model))
            if model == self.scaling_model:
                found += [Server(model, w, (self.scaling_concurrency,)) for w in self.scaling_workers if w != 0]
        if not self.dry_run and self.resnet50 is not None:  # last: what is to decide CUDA_GRAPHS's default
            found.append(Server(self.resnet50, 0, (self.scaling_concurrency,), settings=(("CUDA_GRAPHS", "on"),)))
        return found

    def service_env(self, server: Server) -> dict[str, str]:
        """On a GPU ``SESSION_HOST`` is the service's own (``auto``: one session host where WORKERS > 1); the dry run
        asks for the host where WORKERS > 1 as well, so the CPU runs the topology the GPU measures."""
        shared = {"SESSION_HOST": "shared"} if self.dry_run and server.workers > 1 else {}
        return {"MODELS": server.model, "PROVIDERS": self.providers, "WORKERS": str(server.workers),
                "MAX_BATCH_SIZE": str(self.max_batch),
                "MAX_IMAGES_PER_REQUEST": str(max(64, self.max_batch))} | shared | dict(server.settings)  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {
            "sweep_model": self.sweep_model, "scaling_model": self.scaling_model, "resnet50": self.resnet50,
            "graph_batches": self.graph_batches,
            "servers": [dataclasses.asdict(s) | {"env": self.service_env(s)} for s in self.servers()],
            "ceilings": [{"model": c.model, "options_label": c.options_label, "options": dict(c.options)}
                         for c in self.ceilings()],
        }  # fmt: skip
