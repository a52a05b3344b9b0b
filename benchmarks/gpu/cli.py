"""``python -m benchmarks.gpu``: the stages in order, each bounded, each result saved as soon as it is had.

A GPU session runs this once, in one command of at most 600 s: so every stage is timed against ``--budget`` and
skipped (and said so) where too little is left, ``OUT/gpu.json`` is rewritten after every stage and run (a run cut
short still leaves its figures), and a stage that fails is recorded with its reason while the others go on. The
exit status is 1 where a stage failed, 0 otherwise (targets not met are figures, not failures).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime as dt
import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from service.runtime.cuda import CPU, CUDA, provider_options
from service.settings import Settings
from service.store.host import cpu_count
from service.store.layout import ModelStore
from service.store.metadata import ModelMetadata

from ..arguments import counts, seconds
from ..host import ROOT, machine
from .inprocess import NOT_TAKEN, decode_rate
from .loadgen import LoadPool
from .nvml import Nvml
from .plan import FAMILIES, Ceiling, Plan, Server
from .report import markdown, targets

DESCRIPTION = "The service on a GPU: in-process ceilings, a PyTorch anchor, served HTTP and gRPC runs, the targets."


class Failed(RuntimeError):
    """A stage's failure whose message says all (no traceback needed); ``partial``: what it measured before."""

    def __init__(self, message: str, partial: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.partial = partial


class Run:
    """The results as they grow, the clock against the budget, and what each stage did."""

    def __init__(self, plan: Plan, out: Path) -> None:
        self.plan, self.out = plan, out
        self.began = time.monotonic()
        self.found: dict[str, Any] = {
            "benchmark": "gpu", "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "complete": False, "plan": plan.to_dict(), "failures": {}, "skipped": {},
        }  # fmt: skip

    def elapsed(self) -> float:
        return time.monotonic() - self.began

    def say(self, message: str) -> None:
        print(f"[{self.elapsed():6.1f} s] {message}", flush=True)  # noqa: T201

    def save(self) -> None:
        """``gpu.json`` and ``gpu.md`` as they stand (written again after every stage and run)."""
        self.found["seconds"] = round(self.elapsed(), 1)
        self.out.mkdir(parents=True, exist_ok=True)
        try:
            self.found["targets"] = targets(self.found)
            text = markdown(self.found)
        except Exception as exc:  # the figures are still written: a report's fault must not lose them
            self.found["failures"]["report"] = f"{type(exc).__name__}: {exc}"
            text = f"# GPU benchmark\n\nThe report failed ({exc!r}): see gpu.json.\n"
        for name, content in (("gpu.json", json.dumps(self.found, indent=2) + "\n"), ("gpu.md", text)):
            staged = self.out / f".{name}.part"  # replaced whole: a run killed while writing keeps the last one
            staged.write_text(content)
            os.replace(staged, self.out / name)

    def limit(self, needs: float) -> float:
        """How long a stage that needs about ``needs`` seconds may take: three times that (a first CUDA start is
        slow), never past the budget's end plus a margin, so that one stage that hangs leaves the others theirs."""
        return max(10.0, min(3 * needs + 30, self.plan.budget + 30 - self.elapsed()))

    def stage(self, name: str, needs: float, work: Callable[[], Any]) -> Any:
        """``work()`` if ``needs`` seconds are left of the budget; a failure is recorded and the run goes on."""
        left = self.plan.budget - self.elapsed()
        if needs > left:
            self.found["skipped"][name] = f"needs about {needs:.0f} s, {max(0.0, left):.0f} s of the budget were left"
            self.say(f"SKIPPED {name}: {self.found['skipped'][name]}")
            self.save()
            return None
        self.say(f"{name} ...")
        try:
            return work()
        except Exception as exc:  # recorded, said, and the exit status says a stage failed
            why = str(exc) if isinstance(exc, Failed) else f"{type(exc).__name__}: {exc}"
            self.found["failures"][name] = why if len(why) <= 2000 else f"{why[:1000]} ... {why[-1000:]}"
            self.say(f"FAILED {name}: {self.found['failures'][name]}")
            if not isinstance(exc, Failed):
                traceback.print_exc(file=sys.stderr)
            return None
        finally:
            self.save()


def export_missing(run: Run, store: ModelStore, models: tuple[str, ...]) -> tuple[str, ...]:
    """What the store lacks, with random weights (speed does not depend on them); the FP16 variant from its parent.
    Each model is its own stage: one that fails to export is recorded, and the others are measured. Returns the
    models the store has."""
    run.found["exports"] = {}
    for name in sorted(models, key=lambda n: n.endswith("_fp16")):  # a variant after its parent
        run.stage(f"export {name}", 0, partial(_export, run, store, name))
    return tuple(name for name in models if name in run.found["exports"])


def _export(run: Run, store: ModelStore, name: str) -> None:
    from export.pipeline import ExportOptions, export_model

    parent = name.removesuffix("_fp16")
    if parent != name and parent in run.plan.models and parent not in run.found["exports"]:
        raise Failed(f"{name} is made from {parent}, whose export failed")
    began, took = time.perf_counter(), None
    for needed in dict.fromkeys((parent, name)):  # a variant's parent first, where the store lacks it
        if store.latest(needed) is None:
            if needed.endswith("_fp16"):
                from ..__main__ import export_variant_for_bench  # only here: it imports the v2 protocol (see serve)

                export_variant_for_bench(store, parent, "fp16", quick=False)
            else:
                export_model(needed, store, ExportOptions(weights="random", progress=False))
            took = round(time.perf_counter() - began, 1)
            run.say(f"exported {needed} in {took} s")
    run.found["exports"][name] = stored(store, name) | {"exported_s": took}


def stored(store: ModelStore, name: str) -> dict[str, Any]:
    version = store.latest(name)
    if version is None:
        raise RuntimeError(f"{name} is not in {store.root} after its export")
    meta = version.read_metadata()
    return {"version": version.version, "weights": meta["weights"]["kind"], "precision": meta.get("precision", "fp32")}


def subprocess_json(command: list[str], timeout: float, say: Callable[[str], None]) -> dict[str, Any]:
    """``python -m benchmarks.gpu.inprocess ...``'s JSON line, its stderr said as it comes (its progress, ONNX
    Runtime's warnings); raises with its error and its stderr's end (why a provider did not load, ...)."""
    process = subprocess.Popen([sys.executable, "-m", "benchmarks.gpu.inprocess", *command], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    killer = threading.Timer(timeout, process.kill)
    killer.start()
    tail: collections.deque[str] = collections.deque(maxlen=8)
    stdout: list[str] = []  # read beside stderr: a child that fills one pipe while this reads the other would hang
    reader = threading.Thread(
        target=lambda: stdout.append(process.stdout.read() if process.stdout else ""), daemon=True
    )
    reader.start()
    try:
        for line in process.stderr or ():
            tail.append(line.rstrip())
            say(f"  {tail[-1]}")
        code = process.wait()
        reader.join()
        out = "".join(stdout)
    finally:
        killer.cancel()
        if process.poll() is None:  # this process is being stopped (SIGTERM): not the child left behind
            process.kill()
    lines = [line for line in out.splitlines() if line.startswith("{")]
    found: dict[str, Any] = json.loads(lines[-1]) if lines else {}
    if code != 0 or not lines or "error" in found:
        why = found.get("error") or (f"killed after {timeout:.0f} s" if code == -9 else f"exit {code}")
        printed = [line for line in out.splitlines() if line.strip() and not line.startswith("{")]
        said = f"; it printed: {' | '.join(printed)[-800:]}" if printed else ""  # ONNX Runtime's "EP Error ..."
        raise Failed(f"{why}{said}; its stderr ends: {' | '.join(tail)[-1200:]}", found if "runs" in found else None)
    return found


def service_options(store: ModelStore, model: str) -> dict[str, str]:
    """The CUDA options the service gives ``model``'s graph with default settings (they depend on its precision)."""
    version = store.latest(model)
    if version is None:
        raise RuntimeError(f"{model} is not in the store {store.root}")
    return provider_options(Settings(), ModelMetadata.model_validate(version.read_metadata()).precision)


def graph_batches_of(plan: Plan, config: Ceiling) -> tuple[int, ...]:
    """Where a ceiling times the CUDA_GRAPHS=on path too: the first ResNet-50's, with the service's options."""
    return plan.graph_batches if (config.model, config.options_label) == (plan.resnet50, "service") else ()


def ceiling(run: Run, store: ModelStore, config: Ceiling) -> None:
    plan = run.plan
    options = service_options(store, config.model) if config.options_label == "service" else dict(config.options)
    graph_batches = graph_batches_of(plan, config)
    command = ["ceiling", "--store", str(store.root), "--model", config.model, "--providers", plan.providers,
               "--options", json.dumps(options), "--batches", ",".join(map(str, plan.batches)),
               "--seconds", str(plan.ceiling_seconds),
               "--graph-batches", ",".join(map(str, graph_batches))]  # fmt: skip
    try:
        found = subprocess_json(command, run.limit(ceiling_cost(plan, len(graph_batches))), run.say)
    except Failed as failed:  # killed part-way: the batch sizes it had timed are kept, the stage still fails
        if failed.partial is not None:
            run.found["ceilings"].append(failed.partial | {"options_label": config.options_label, "cut_short": True})
        raise
    found["options_label"] = config.options_label
    run.found["ceilings"].append(found)
    if not found["runs"]:  # every size failed
        raise Failed("; ".join(f"batch {e['batch']}: {e['error']}" for e in found["errors"]) or "no batch size ran")
    best = max(found["runs"], key=lambda r: r["images_per_s"])
    run.say(f"{config.model} ({config.options_label} options) on {found['providers_taken'][0]}: best "
            f"{best['images_per_s']:.0f} images/s ({best['path']}, batch {best['batch']})")  # fmt: skip
    if found["errors"]:  # the sizes that ran are kept above; a path that failed at some size fails the stage
        raise Failed("; ".join(f"batch {e['batch']}: {e['error']}" for e in found["errors"]))


def anchor(run: Run) -> None:
    plan = run.plan
    if plan.providers != "cuda":
        missing = [m for m in ("torch", "torchvision") if importlib.util.find_spec(m) is None]
        reason = "the anchor runs on CUDA only (--providers cpu)"
        if missing:
            reason += f"; {' and '.join(missing)} cannot be imported here"
        run.found["anchor"] = {"images_per_s": None, "reason": reason}
    else:
        command = ["anchor", "--batches", ",".join(map(str, plan.anchor_batches)), "--seconds",
                   str(plan.ceiling_seconds * 2)]  # fmt: skip
        run.found["anchor"] = subprocess_json(command, run.limit(anchor_cost(plan)), run.say)
    a = run.found["anchor"]
    run.say(f"PyTorch anchor: {a['images_per_s'] if a['images_per_s'] else 'none: ' + a['reason']}")


def ceiling_cost(plan: Plan, graph_batches: int = 0) -> float:
    """About how long one in-process ceiling takes: its session, then each batch size timed two ways, and the
    CUDA_GRAPHS=on path (a second session, a capture per shape) at ``graph_batches`` sizes."""
    graphs = 8 + graph_batches * (plan.ceiling_seconds + 1.5) if graph_batches else 0
    return 8 + len(plan.batches) * 2 * (plan.ceiling_seconds + 0.5) + graphs


def anchor_cost(plan: Plan) -> float:
    return 15 + len(plan.anchor_batches) * (2 * plan.ceiling_seconds + 3)


def needs(plan: Plan, server: Server) -> float:
    """About how long a server's stage takes: its start, its runs, its every-batch-size run."""
    start = 30.0 if plan.providers == "cuda" else 5.0
    runs = len(server.http) + len(server.grpc)
    return start + runs * (plan.warmup + plan.seconds + 1.5) + (plan.sweep_seconds / 2 if server.sweep else 0.0)


def benchmark(run: Run, store: ModelStore) -> None:
    plan, found = run.plan, run.found
    nvml = Nvml()
    try:
        described = machine()
    except Exception as exc:  # a package missing on the GPU machine must not cost the run: the stages say what
        import onnxruntime as ort

        described = {
            "cpu": "unknown",
            "cores": cpu_count(),
            "cpu_flags": [],
            "onnxruntime": ort.__version__,
            "commit": "unknown",
            "error": f"{type(exc).__name__}: {exc}",
        }  # what the report reads
    found |= {"machine": described, "gpu": nvml.describe(), "providers_available": _providers(),
              "ceilings": [], "served": []}  # fmt: skip
    if plan.providers == "cuda":
        found["cuda_libraries"] = _cuda_libraries()
    found["machine"]["providers"] = [CUDA, CPU] if plan.providers == "cuda" else [CPU]
    run.say(f"GPU: {found['gpu'].get('name') or found['gpu'].get('reason')}; CPU: {found['machine']['cpu']}, "
            f"{found['machine']['cores']} cores, flags {', '.join(found['machine']['cpu_flags'])}")  # fmt: skip
    models = export_missing(run, store, plan.models)
    if not models:
        return  # nothing to measure without the models
    if models != plan.models:  # what failed to export is not measured (the failures say why)
        run.plan = plan = dataclasses.replace(plan, models=models)
        found["plan"] = plan.to_dict()
    run.stage("decode", 5, partial(_decode, run))
    for config in plan.ceilings():
        label = f"ceiling {config.model} ({config.options_label})"
        run.stage(label, ceiling_cost(plan, len(graph_batches_of(plan, config))), partial(ceiling, run, store, config))
    run.stage("anchor", anchor_cost(plan), partial(anchor, run))
    served_stages(run, store, nvml)


def served_stages(run: Run, store: ModelStore, nvml: Nvml) -> None:
    """One stage per server; none on a GPU that took no in-process session (each start would wait out its timeout
    with models that cannot load)."""
    plan, found = run.plan, run.found
    logs = run.out / "servers.log"  # every server's log, one after the other (a device gives back 8 files at most)
    logs.unlink(missing_ok=True)  # a run before this one's
    refused = [why for stage, why in found["failures"].items() if stage.startswith("ceiling") and NOT_TAKEN in why]
    if plan.providers == "cuda" and refused and not any(c["providers_taken"][0] == CUDA for c in found["ceilings"]):
        for server in plan.servers():
            found["skipped"][f"served {server.label}"] = "CUDA took no in-process session (see failures)"
        return
    from .served import serve  # here: it imports the v2 protocol, whose "inference" package tritonclient's clashes with

    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as homes, LoadPool(plan.load_processes) as pool:
        for server in plan.servers():
            twin = measured_already(found, plan, server)
            if twin is not None:
                found["skipped"][f"served {server.label}"] = f"measured already: {twin} ran {server.workers} workers"
                run.say(f"not served again: {server.label}, {found['skipped'][f'served {server.label}']}")
                continue
            record: dict[str, Any] = {"server": server.label, "model": server.model, "workers": server.workers,
                                      "env": plan.service_env(server), "trial": dict(server.settings), "runs": [],
                                      "sweep": None}  # fmt: skip
            found["served"].append(record)
            work = partial(serve, store, server, plan, pool, nvml, logs, Path(homes), record, run.save, run.say,
                           lambda: run.plan.budget + 30 - run.elapsed())  # fmt: skip
            run.stage(f"served {server.label}", needs(plan, server), work)


def measured_already(found: dict[str, Any], plan: Plan, server: Server) -> str | None:
    """The server already run whose ``WORKERS=0`` resolved to ``server``'s count, with the same settings otherwise
    and a run at each of its concurrency levels: ``server`` would measure it again."""
    settings = {k: v for k, v in plan.service_env(server).items() if k != "WORKERS"}
    for record in found["served"]:
        ran = {(r["path"], r["concurrency"]) for r in record["runs"]}
        if (record["model"] == server.model and record["workers"] == 0
                and record.get("workers_resolved") == server.workers
                and {k: v for k, v in record["env"].items() if k != "WORKERS"} == settings
                and all(("http", c) in ran for c in server.http)):  # fmt: skip
            return str(record["server"])
    return None


def _decode(run: Run) -> None:
    from .served import BODY_SIDE, bodies

    files, _ = bodies("resnet50")
    run.found["decode"] = found = decode_rate(files, max(1.0, run.plan.ceiling_seconds * 2))
    rate = found["images_per_s_per_core"]
    run.say(f"CPU decode + resize to 224 of {BODY_SIDE}-px JPEGs: {rate} images/s on one core")


def _cuda_libraries() -> dict[str, Any]:
    """Where CUDA's libraries come from on this machine (said before any stage, for a run whose CUDA fails)."""
    from service.runtime import cuda

    libraries, cudnn = cuda.wheel_directories()
    found = {"cuda": str(libraries) if libraries else None, "cudnn": str(cudnn) if cudnn else None}
    return found | {"ld_library_path": os.environ.get("LD_LIBRARY_PATH")}


def _providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def parse(argv: list[str] | None) -> tuple[Plan, Path, Path]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=DESCRIPTION)
    parser.add_argument("--providers", choices=("cuda", "cpu"), default="cuda",
                        help="cuda: the GPU run; cpu: the short dry run CI makes (default %(default)s)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu"),
                        help="gpu.json and gpu.md go here (default %(default)s)")  # fmt: skip
    parser.add_argument("--store", type=Path, default=Path("benchmarks/.store-gpu"),
                        help="model store; what it lacks is exported into it (default %(default)s)")  # fmt: skip
    parser.add_argument(
        "--models", help=f"comma-separated among {','.join(FAMILIES)} (cuda: all; cpu: lenet5,resnet50)"
    )
    parser.add_argument("--batches", type=counts, help="in-process batch sizes (cuda 1,8,32,64,128,256; cpu 1,8)")
    parser.add_argument("--concurrency", type=counts, help="served concurrency levels (cuda 32,128,256; cpu 8,16)")
    parser.add_argument("--max-batch", type=int, dest="max_batch", help="the service's MAX_BATCH_SIZE (cuda 64; cpu 8)")
    parser.add_argument("--seconds", type=seconds, help="per served run, after its warm-up (cuda 5; cpu 2)")
    parser.add_argument("--warmup", type=float, help="per served run (cuda 1; cpu 0.5)")
    parser.add_argument("--ceiling-seconds", type=seconds, dest="ceiling_seconds",
                        help="per in-process batch size and path (cuda 1; cpu 0.5)")  # fmt: skip
    parser.add_argument("--load-processes", type=int, dest="load_processes", help="load generator processes")
    parser.add_argument("--budget", type=seconds, help="seconds after which no stage starts (cuda 540; cpu 300)")
    args = parser.parse_args(argv)

    models = None if args.models is None else tuple(m for m in args.models.split(",") if m)
    plan = Plan.make(args.providers, cpu_count(), models=models, batches=args.batches,
                     concurrency=args.concurrency, max_batch=args.max_batch,
                     seconds=args.seconds, warmup=args.warmup, ceiling_seconds=args.ceiling_seconds,
                     load_processes=args.load_processes, budget=args.budget)  # fmt: skip
    try:
        plan.check()
    except ValueError as exc:
        parser.error(str(exc))
    return plan, args.out, args.store


def stop_leftovers(store: Path) -> list[int]:
    """The processes serving ``store`` that a run killed outright (SIGKILL: no handler runs) left behind, killed:
    its servers run in sessions of their own, which the kill does not reach, and they would hold the GPU's memory
    and the cores the next run measures. Their pids."""
    import psutil

    wanted = {str(store), str(store.resolve())}
    spared = {os.getpid(), *(parent.pid for parent in psutil.Process().parents())}  # a shell that exported it, say
    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if process.pid not in spared and process.environ().get("MODEL_STORE") in wanted:
                found.append(process)
    for process in found:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(found, timeout=10)
    return sorted(process.pid for process in found)


def _stop(signum: int, _frame: Any) -> None:
    """timeout's TERM: the servers are stopped and the figures saved on the way out (a second TERM is ignored,
    so that it cannot cut that short)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _stop)
    plan, out, store_dir = parse(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    run = Run(plan, out)
    run.say(f"GPU benchmark, --providers {plan.providers}: models {', '.join(plan.models)}; results to {out}")
    store_dir.mkdir(parents=True, exist_ok=True)
    if left := stop_leftovers(store_dir):
        run.say(f"stopped {len(left)} processes serving {store_dir} that a run killed outright left behind")
    try:
        benchmark(run, ModelStore(store_dir))
        run.found["complete"] = True
    finally:
        run.save()
    for target in run.found["targets"]:
        run.say(f"target {target['target']}: {target['status']} ({target['measured'] or 'nothing measured'})")
    run.say(f"wrote {out / 'gpu.json'} and {out / 'gpu.md'} in {run.elapsed():.0f} s")
    for stage, why in run.found["skipped"].items():
        run.say(f"SKIPPED {stage}: {why}")
    if run.found["failures"]:
        print(f"FAILED: {'; '.join(f'{k}: {v}' for k, v in run.found['failures'].items())}", file=sys.stderr)  # noqa: T201
        return 1
    return 0
