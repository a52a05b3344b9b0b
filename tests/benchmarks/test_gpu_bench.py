"""`python -m benchmarks.gpu`: its CPU dry run end to end (structure, not speed), and the GPU run's judging and
plan, which no CI machine can run, on figures shaped as a GPU run writes them."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from benchmarks.gpu import cli, inprocess
from benchmarks.gpu.cli import Run, export_missing, measured_already, stop_leftovers
from benchmarks.gpu.loadgen import multipart, split
from benchmarks.gpu.plan import Ceiling, Plan, Server
from benchmarks.gpu.report import DRY, markdown, targets
from service.store.layout import ModelStore

from ..helpers import ROOT


@pytest.mark.integration
@pytest.mark.slow
def test_the_dry_run_measures_every_stage_on_the_cpu(tmp_path: Path) -> None:
    """About 70 s on two cores: the exports into an empty store, then every stage with the CPU's short plan."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "benchmarks.gpu", "--providers", "cpu", "--store", str(tmp_path / "store"),
               "--out", str(out)]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    found = json.loads((out / "gpu.json").read_text())
    assert found["complete"] and not found["failures"] and not found["skipped"]
    assert set(found["exports"]) == {"lenet5", "resnet50"} and found["exports"]["resnet50"]["weights"] == "random"
    # in-process: both models, both paths, both batch sizes (and CUDA_GRAPHS=on's path on ResNet-50, here on the
    # CPU's fixed buffers), on the provider the session really took
    rows = {(c["model"], r["path"], r["batch"]) for c in found["ceilings"] for r in c["runs"]}
    assert rows == {(m, p, b) for m in ("lenet5", "resnet50") for p in ("numpy", "iobinding") for b in (1, 8)} | {
        ("resnet50", "fixed-buffers", b) for b in (1, 8)
    }  # fmt: skip
    assert all(c["cuda_graph_error"] is None for c in found["ceilings"])
    assert all(c["providers_taken"] == ["CPUExecutionProvider"] for c in found["ceilings"])
    service_fp32 = {"cudnn_conv_algo_search": "HEURISTIC", "prefer_nhwc": "0", "use_tf32": "1"}  # what CUDA would get
    assert all(c["provider_options_requested"] == service_fp32 for c in found["ceilings"])
    assert all(r["images_per_s"] > 0 for c in found["ceilings"] for r in c["runs"])
    # a first call is a new shape's only on the path that runs it first: IOBinding's follows the numpy path's
    firsts = {r["path"]: r["first_call_ms"] for c in found["ceilings"] for r in c["runs"]}
    assert firsts["numpy"] > 0 and firsts["iobinding"] is None
    anchor = found["anchor"]
    assert (anchor["images_per_s"] is None and anchor["reason"]) or all(v > 0 for v in anchor["images_per_s"].values())
    # served: every run answered, every error counted (none), the GPU's figure absent with its reason
    runs = {(s["model"], s["workers"], r["path"], r["concurrency"]): r for s in found["served"] for r in s["runs"]}
    assert {(m, w, p) for m, w, p, _ in runs} == {
        ("lenet5", 0, "http"), ("resnet50", 0, "http"), ("resnet50", 0, "grpc-pixels"), ("lenet5", 1, "http"),
        ("lenet5", 2, "http"),
    }  # fmt: skip
    for run in runs.values():
        assert run["requests"] > 0 and run["errors"] == 0 and run["images_per_s"] > 0, run
        assert run["gpu_busy_mean_pct"] is None and run["gpu_reason"] and run["server_cores"] > 0
    served = [(s["model"], s["workers"]) for s in found["served"]]
    assert served == [("lenet5", 0), ("lenet5", 1), ("lenet5", 2), ("resnet50", 0)]  # the scaling model's together
    assert [s["workers_resolved"] for s in found["served"]] == [2, 1, 2, 1]  # WORKERS=0 is one per CPU for LeNet-5
    # WORKERS=2 runs one session host, as it would on a GPU; WORKERS=0 resolved to 2 on the CPU keeps its own
    assert [s["session_host"] for s in found["served"]] == [False, False, True, False]
    sweep = found["served"][0]["sweep"]
    assert sweep["sizes_covered"] == sweep["sizes_wanted"] == 8 and sweep["errors"] == 0
    assert sweep["one_batch_per_request"] and sweep["ratio"] > 0
    assert found["decode"]["images_per_s_per_core"] > 0
    # each server's log kept beside the figures (deleted with a temporary folder, it was lost with a failure's
    # cause), one after the other in one file: a device machine gives back 8 files at most
    assert sorted(p.name for p in out.iterdir()) == ["gpu.json", "gpu.md", "servers.log"]
    sections = dict(part.split(" =====\n", 1) for part in (out / "servers.log").read_text().split("===== ")[1:])
    assert list(sections) == ["lenet5 WORKERS=0", "lenet5 WORKERS=1", "lenet5 WORKERS=2", "resnet50 WORKERS=0"]
    assert "session host" in sections["lenet5 WORKERS=2"]
    assert "ready on CPUExecutionProvider" in sections["resnet50 WORKERS=0"]
    assert found["gpu"]["available"] is False and found["gpu"]["reason"]
    assert all(t["status"] == DRY for t in found["targets"]) and len(found["targets"]) == 7
    table = (out / "gpu.md").read_text()
    assert found["machine"]["cpu"] in table and "no GPU" in table and "## Targets" in table
    assert "[" in result.stdout and "every batch size" in result.stdout  # progress lines as it goes


def _serving(store: Path) -> list[psutil.Process]:
    """The processes serving ``store`` (the benchmark's servers, their workers and session host)."""
    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if process.environ().get("MODEL_STORE") == str(store):
                found.append(process)
    return found


@pytest.mark.integration
@pytest.mark.parametrize("when", ["WORKERS=0 ...", "WORKERS=0: ready"], ids=["starting", "ready"])
def test_a_run_stopped_by_timeout_saves_its_figures_and_stops_its_server(tmp_path: Path, when: str) -> None:
    """``timeout`` ends a GPU run with SIGTERM to its process group, while a server starts or once it serves: the
    run saves what it has and stops that server (in a session of its own, the signal does not reach it; left
    running, it would hold the GPU)."""
    out, store = tmp_path / "out", tmp_path / "store"
    command = [sys.executable, "-m", "benchmarks.gpu", "--providers", "cpu", "--models", "lenet5", "--store",
               str(store), "--out", str(out)]  # fmt: skip
    bench = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                             start_new_session=True)  # fmt: skip
    try:
        assert bench.stdout is not None
        for line in bench.stdout:
            if when in line:  # "served lenet5 WORKERS=0 ...": the stage begins, its server starting
                break
        else:
            pytest.fail("the run ended before serving")
        if "ready" in when:
            assert _serving(store)
        else:  # the server spawned, and not yet up (BentoML takes seconds to start)
            time.sleep(1.0)
            assert _serving(store)
        os.killpg(bench.pid, signal.SIGTERM)  # as timeout does: its whole group (the load processes with it)
        assert bench.wait(timeout=60) == 128 + signal.SIGTERM
        _, alive = psutil.wait_procs(_serving(store), timeout=10)
        assert not alive, f"left running: {[p.cmdline() for p in alive]}"
    finally:
        bench.kill()
        for process in _serving(store):  # where the run left them, not to outlive the test
            with contextlib.suppress(psutil.Error):
                process.kill()
    found = json.loads((out / "gpu.json").read_text())
    assert not found["complete"] and found["ceilings"] and found["served"][0]["server"] == "lenet5 WORKERS=0"


def test_a_model_that_fails_to_export_leaves_the_others_measured(tmp_path: Path) -> None:
    """One export failing (a model the export stage does not know, here) is that model's failure; the others are
    exported and measured, rather than the whole run ending with nothing."""
    plan = dataclasses.replace(Plan.make("cpu", 2), models=("nosuchnet", "lenet5"))
    run = Run(plan, tmp_path / "out")
    assert export_missing(run, ModelStore(tmp_path / "store"), plan.models) == ("lenet5",)
    failed = {stage: why for stage, why in run.found["failures"].items() if stage.startswith("export")}
    assert set(failed) == {"export nosuchnet"} and "Unknown model 'nosuchnet'" in failed["export nosuchnet"]
    assert run.found["exports"]["lenet5"]["weights"] == "random" and run.found["exports"]["lenet5"]["exported_s"] > 0
    assert "export nosuchnet" in json.loads((tmp_path / "out" / "gpu.json").read_text())["failures"]  # saved


def test_a_batch_size_that_failed_in_process_fails_its_stage_and_the_others_are_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A path that failed at some batch size (IOBinding on a GPU, at every size say) was printed and the stage
    passed: the run exited 0 and the target read "not measured". The stage fails now, its other sizes kept."""
    measured = {"model": "resnet50_fp16", "providers_taken": ["CUDAExecutionProvider"],
                "runs": [{"path": "numpy", "batch": 64, "images_per_s": 6000.0}],
                "errors": [{"batch": 256, "error": "RuntimeError: CUDA failure 2: out of memory"}]}  # fmt: skip
    monkeypatch.setattr(cli, "subprocess_json", lambda *args: dict(measured))
    run = Run(Plan.make("cpu", 2), tmp_path / "out")
    run.found["ceilings"] = []
    config = Ceiling("resnet50_fp16", "onnxruntime-defaults")
    run.stage("ceiling resnet50_fp16", 1.0, lambda: cli.ceiling(run, ModelStore(tmp_path / "store"), config))
    assert run.found["failures"]["ceiling resnet50_fp16"] == "batch 256: RuntimeError: CUDA failure 2: out of memory"
    assert [c["runs"] for c in run.found["ceilings"]] == [measured["runs"]]
    assert json.loads((tmp_path / "out" / "gpu.json").read_text())["failures"]  # saved


def test_the_cuda_graph_path_runs_at_its_sizes(model_store: ModelStore) -> None:
    """The in-process ceiling as the benchmark runs it, in a process of its own (its imports meet no other's)."""
    command = ["ceiling", "--store", str(model_store.root), "--model", "lenet5", "--providers", "cpu", "--batches",
               "1,2", "--seconds", "0.05", "--graph-batches", "2"]  # fmt: skip
    found = cli.subprocess_json(command, 120, lambda line: None)
    assert {(r["path"], r["batch"]) for r in found["runs"]} == {
        ("numpy", 1), ("iobinding", 1), ("numpy", 2), ("iobinding", 2), ("fixed-buffers", 2)
    }  # fmt: skip
    assert found["cuda_graph_error"] is None and found["errors"] == []


def test_a_cuda_graph_session_refused_is_said_once_and_not_opened_again() -> None:
    opened: list[int] = []

    def refused() -> Any:
        opened.append(1)
        raise RuntimeError("This session cannot use the CUDA Graph feature as requested by the user")

    graphs, found = inprocess.Graphed(refused), {"cuda_graph_error": None}
    assert graphs.session(found) is None and graphs.session(found) is None  # the ceiling's other paths go on
    assert opened == [1] and "cannot use the CUDA Graph" in str(found["cuda_graph_error"])


def test_servers_a_run_killed_outright_left_behind_are_stopped_by_the_next(tmp_path: Path) -> None:
    """SIGKILL reaches no handler, and the servers run in sessions of their own: left serving the store, they held
    the GPU and the cores of the next run on a machine kept warm."""
    store = tmp_path / "store"
    sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
    left = subprocess.Popen(sleeper, env={**os.environ, "MODEL_STORE": str(store)}, start_new_session=True)
    other = subprocess.Popen(sleeper, env={**os.environ, "MODEL_STORE": str(tmp_path / "another")})
    try:
        deadline = time.monotonic() + 10
        while psutil.Process(left.pid).environ().get("MODEL_STORE") != str(store) and time.monotonic() < deadline:
            time.sleep(0.05)  # exec'd with its own environment
        assert stop_leftovers(store) == [left.pid]
        assert not psutil.pid_exists(left.pid) and other.poll() is None  # killed and reaped; the other store's stays
    finally:
        for process in (left, other):
            process.kill()
            process.wait()


def gpu_run(fp16_http: float, p99: float, anchor: float, workers1: float) -> dict[str, Any]:
    """A GPU run's results as the benchmark writes them, with these figures and fixed others."""
    plan = Plan.make("cuda", 16)

    def run(path: str, c: int, images_per_s: float, p99_ms: float = 50.0, errors: int = 0) -> dict[str, Any]:
        return {"path": path, "concurrency": c, "images_per_s": images_per_s, "p50_ms": 20.0, "p99_ms": p99_ms,
                "errors": errors, "requests": 1000, "mean_batch": 30.0, "gpu_busy_mean_pct": 80.0,
                "server_cores": 6.0, "client_cores": 2.0}  # fmt: skip

    def server(model: str, workers: int, runs: list[dict[str, Any]], sweep: Any = None) -> dict[str, Any]:
        resolved = workers or (16 if model == "lenet5" else 4)  # WORKERS=0 on 16 cores: LeNet-5 16, on CUDA 4
        return {"model": model, "workers": workers, "workers_resolved": resolved, "runs": runs, "sweep": sweep}

    sweep = {"max_batch": 64, "requests": 320, "sizes_covered": 64, "sizes_wanted": 64, "errors": 0, "p50_ms": 10.0,
             "largest_p99_ms": 25.0, "largest_p99_at": 64, "ratio": 2.5, "one_batch_per_request": True,
             "worst_size": {"images": 3, "p50_ms": 4.0, "p99_ms": 9.0, "ratio": 2.25},
             "gpu_busy_mean_pct": 40.0}  # fmt: skip
    ceiling_runs = [{"path": p, "batch": b, "images_per_s": 100.0 * b, "p50_ms": 1.0, "p99_ms": 2.0,
                     "first_call_ms": 3.0} for p in ("numpy", "iobinding") for b in plan.batches]  # fmt: skip
    return {
        "started": "2026-12-01T00:00:00+00:00", "seconds": 450.0, "complete": True, "plan": plan.to_dict(),
        "machine": {"cpu": "Some Xeon", "cores": 16, "cpu_flags": ["avx2"], "onnxruntime": "1.31.1",
                    "commit": "0123456789abcdef"},
        "gpu": {"available": True, "name": "NVIDIA H100 80GB HBM3", "memory_total_mib": 81559, "driver": "580"},
        "providers_available": ["CUDAExecutionProvider", "CPUExecutionProvider"],
        "ceilings": [{"model": "resnet50_fp16", "options_label": label, "providers_taken": ["CUDAExecutionProvider"],
                      "provider_options": {"cudnn_conv_algo_search": "EXHAUSTIVE"}, "runs": ceiling_runs}
                     for label in ("service", "onnxruntime-defaults")],
        "anchor": {"images_per_s": {"256": anchor, "64": 6400.0}, "reason": None, "torch": "2.11", "cuda": "13.0",
                   "cudnn": 91000, "setup": "as benchmarked", "runs": []},
        "served": [
            server("resnet50_fp16", 0, [run("http", 128, fp16_http, p99), run("grpc-pixels", 128, 5000.0)], sweep),
            server("resnet50", 0, [run("http", 128, 3000.0)]),
            server("lenet5", 0, [run("http", 256, 12000.0)]),
            server("resnet50_fp16", 1, [run("http", 128, workers1)]),
            server("resnet50_fp16", 2, [run("http", 128, fp16_http)]),
        ],
        "decode": {"images_per_s_per_core": 1500.0, "resize": 256, "to": [224, 224, 3], "file_bytes": [1],
                   "p50_ms": 0.6},
        "failures": {}, "skipped": {},
    }  # fmt: skip


def test_the_resnet50_ceiling_is_budgeted_with_its_cuda_graph_path() -> None:
    """Its stage times CUDA_GRAPHS=on at the service's shapes as well (a second session, a capture per shape): the
    budget check that starts it counts that, as the time limit that stops it does."""
    plan = Plan.make("cuda", 16)
    costs = {
        (c.model, c.options_label): cli.ceiling_cost(plan, len(cli.graph_batches_of(plan, c))) for c in plan.ceilings()
    }
    assert cli.graph_batches_of(plan, Ceiling("resnet50_fp16", "service")) == (1, 8, 32, 64)  # MAX_BATCH_SIZE 64
    assert costs[("resnet50_fp16", "service")] > costs[("resnet50_fp16", "onnxruntime-defaults")]
    assert costs[("resnet50", "service")] == costs[("lenet5", "service")]  # the first ResNet-50's alone


def test_a_copy_without_git_records_the_commit_it_was_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tree a GPU machine is lent has no ``.git``: BENCH_COMMIT names the commit its figures belong to."""
    from benchmarks import host

    monkeypatch.setenv("BENCH_COMMIT", "0123456789abcdef")
    assert host.machine()["commit"] == "0123456789abcdef"
    monkeypatch.delenv("BENCH_COMMIT")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert host.machine()["commit"] == (head or "unknown")


def test_a_gpu_run_is_judged_target_by_target() -> None:
    found = gpu_run(fp16_http=4500.0, p99=80.0, anchor=20_000.0, workers1=4600.0)
    status = {t["target"].split(":")[0].split(" >=")[0]: t["status"] for t in targets(found)}
    assert status == {
        "HTTP JPEG FP16": "met",
        "HTTP JPEG FP32": "not met",  # 3000 < 3500
        "gRPC uint8 FP16": "met",  # 5000 / 6400 (numpy path, the service's options, batch <= 64) = 0.78
        "in-process FP16": "met",  # 25,600 / 20,000 at batch 256, 6400 / 6400 at 64
        "LeNet-5 HTTP": "met",
        "every-batch-size run": "met",
        "WORKERS 2 and 4": "not met",  # 4 (WORKERS=0 on 16 cores) and 2 at 4500 < 1 at 4600
    }
    found = gpu_run(fp16_http=4500.0, p99=120.0, anchor=30_000.0, workers1=4400.0)
    judged = {t["target"].split(":")[0].split(" >=")[0]: t for t in targets(found)}
    assert judged["HTTP JPEG FP16"]["status"] == "not met"  # p99 120 ms > 100
    assert (
        judged["in-process FP16"]["status"] == "not met" and "batch 256: 0.85" in judged["in-process FP16"]["measured"]
    )
    assert judged["WORKERS 2 and 4"]["status"] == "met"


def test_what_a_gpu_run_did_not_measure_is_never_judged() -> None:
    found = gpu_run(fp16_http=4500.0, p99=80.0, anchor=20_000.0, workers1=4400.0)
    found["served"] = [s for s in found["served"] if s["model"] != "lenet5" and s["workers"] != 2]
    found["served"][0]["runs"][0]["errors"] = 3
    found["anchor"] = {"images_per_s": None, "reason": "torch sees no CUDA device"}
    judged = {t["target"].split(":")[0].split(" >=")[0]: t for t in targets(found)}
    assert judged["LeNet-5 HTTP"]["status"] == "not measured" and judged["LeNet-5 HTTP"]["measured"] is None
    assert judged["WORKERS 2 and 4"]["status"] == "not measured"
    assert judged["in-process FP16"]["status"] == "not measured"
    assert judged["HTTP JPEG FP16"]["status"] == "not met"  # a run with errors meets no target
    found["targets"] = targets(found)
    table = markdown(found)
    assert "NVIDIA H100 80GB HBM3" in table and "Some Xeon" in table and "torch sees no CUDA device" in table
    assert "| resnet50_fp16 WORKERS=0 (4 running) | http | 128 | 4500.0 |" in table


def test_cuda_graphs_are_shown_beside_the_defaults_and_never_judged() -> None:
    """A trial server (CUDA_GRAPHS=on) faster than every target, with errors: the targets read the defaults' servers
    only, and the report puts the trial beside them, in-process and served."""
    found = gpu_run(fp16_http=3000.0, p99=80.0, anchor=20_000.0, workers1=2900.0)
    before = targets(found)
    trial = {"model": "resnet50_fp16", "workers": 0, "workers_resolved": 4, "sweep": None,
             "server": "resnet50_fp16 WORKERS=0 CUDA_GRAPHS=on", "trial": {"CUDA_GRAPHS": "on"},
             "runs": [dict(found["served"][0]["runs"][0], images_per_s=4500.0, errors=2)]}  # fmt: skip
    found["served"].append(trial)
    found["ceilings"][0]["runs"].append({"path": "cuda-graph", "batch": 64, "images_per_s": 8000.0, "p50_ms": 1.0,
                                         "p99_ms": 2.0, "first_call_ms": 900.0})  # fmt: skip
    found["ceilings"][1]["cuda_graph_error"] = "RuntimeError: a node is not on CUDA"
    assert targets(found) == before
    found["targets"] = before
    table = markdown(found)
    assert "- resnet50_fp16 in-process, batch 64: 8000 images/s (cuda-graph) against 6400 (numpy), 1.25x" in table
    assert "- resnet50_fp16 in-process: CUDA graphs failed: RuntimeError: a node is not on CUDA" in table
    assert ("- resnet50_fp16 WORKERS=0 CUDA_GRAPHS=on served http c=128: 4500 images/s, p99 80.0 ms, 2 errors; "
            "3000 with the defaults, 1.50x") in table  # fmt: skip
    assert "| resnet50_fp16 WORKERS=0 CUDA_GRAPHS=on (4 running) | http | 128 | 4500.0 |" in table


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--concurrency", "abc"], "argument --concurrency: 'abc' is not comma-separated whole numbers"),
        (["--batches", "1,x"], "argument --batches: '1,x' is not comma-separated whole numbers"),
        (["--concurrency", "0"], "argument --concurrency: '0': every number is 1 or more"),
        (["--max-batch", "0"], "--max-batch takes a whole number of 1 or more"),
        (["--load-processes", "0"], "--load-processes takes a whole number of 1 or more"),
        (["--seconds", "-1"], "argument --seconds: '-1' is not a number of seconds above 0"),
        (["--budget", "0"], "argument --budget: '0' is not a number of seconds above 0"),
        (["--models", ","], "--models names none"),
    ],
)
def test_a_plan_that_cannot_run_is_refused_before_any_stage(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """They were a traceback (`abc`), or taken: a run at concurrency 0 or with no model measured nothing."""
    with pytest.raises(SystemExit) as exited:
        cli.parse(["--providers", "cpu", *argv])
    assert exited.value.code == 2 and says in capsys.readouterr().err
    assert cli.parse(["--providers", "cpu", "--warmup", "0"])[0].warmup == 0  # no warm-up is a plan


def test_the_gpu_plan_serves_each_model_then_each_workers_count() -> None:
    plan = Plan.make("cuda", 16)
    assert plan.servers() == [  # the budget spent leaves out the last: not the scaling target's servers
        Server("resnet50_fp16", 0, (32, 128, 256), (32, 128, 256), sweep=True),
        Server("resnet50_fp16", 1, (128,)),
        Server("resnet50_fp16", 2, (128,)),
        Server("resnet50_fp16", 4, (128,)),
        Server("resnet50", 0, (128, 256)),  # what its target reads (c128), and above
        Server("lenet5", 0, (128, 256)),
        Server("resnet50_fp16", 0, (128,), settings=(("CUDA_GRAPHS", "on"),)),  # a trial, last
    ]
    assert plan.servers()[-1].label == "resnet50_fp16 WORKERS=0 CUDA_GRAPHS=on"
    assert plan.service_env(plan.servers()[-1])["CUDA_GRAPHS"] == "on"
    assert plan.graph_batches == (1, 8, 32, 64)  # the in-process CUDA graphs: the sizes the service batches
    assert [(c.model, c.options_label) for c in plan.ceilings()] == [
        ("resnet50_fp16", "service"), ("resnet50_fp16", "onnxruntime-defaults"), ("resnet50", "service"),
        ("lenet5", "service"),
    ]  # fmt: skip
    assert dict(plan.ceilings()[1].options) == {}  # ONNX Runtime's own, beside the service's
    env = plan.service_env(plan.servers()[0])
    assert (env["MODELS"], env["PROVIDERS"], env["WORKERS"], env["MAX_BATCH_SIZE"]) == (
        "resnet50_fp16",
        "cuda",
        "0",
        "64",
    )
    dry = Plan.make("cpu", 2)
    assert [s.label for s in dry.servers()] == ["lenet5 WORKERS=0", "lenet5 WORKERS=1", "lenet5 WORKERS=2",
                                                "resnet50 WORKERS=0"]  # fmt: skip
    with pytest.raises(ValueError, match="CUDA only"):
        Plan.make("cpu", 2, models=("resnet50_fp16",)).check()


def test_a_workers_count_the_sizing_already_served_is_not_served_again() -> None:
    """On 16 cores the ResNets' WORKERS=0 is 4: the scaling server asked for 4 would measure it again (a minute of
    the GPU's budget), unless its settings differ (the dry run's WORKERS=2 asks for the session host)."""
    plan = Plan.make("cuda", 16)
    main, _, two, four, *_ = plan.servers()
    runs = [{"path": "http", "concurrency": c} for c in main.http]
    record = {"server": main.label, "model": main.model, "workers": 0, "workers_resolved": 4,
              "env": plan.service_env(main), "runs": runs}  # fmt: skip
    found: dict[str, Any] = {"served": [record]}
    assert (
        measured_already(found, plan, four) == "resnet50_fp16 WORKERS=0" and measured_already(found, plan, two) is None
    )
    record["env"] = record["env"] | {"MAX_BATCH_SIZE": "128"}  # not the same service
    assert measured_already(found, plan, four) is None
    dry = Plan.make("cpu", 2)
    lenet = dry.servers()[0]
    record = {"server": lenet.label, "model": "lenet5", "workers": 0, "workers_resolved": 2,
              "env": dry.service_env(lenet), "runs": [{"path": "http", "concurrency": c} for c in (8, 16)]}  # fmt: skip
    assert measured_already({"served": [record]}, dry, dry.servers()[2]) is None  # SESSION_HOST=shared there


def test_the_load_is_split_over_processes_and_multipart_bodies_are_built_once() -> None:
    assert split(5, 4) == [2, 1, 1, 1] and split(2, 4) == [1, 1] and split(256, 4) == [64] * 4
    body, content_type = multipart([b"\xff\xd8one", b"\xff\xd8two"], "image/jpeg")
    boundary = content_type.split("boundary=")[1]
    assert content_type.startswith("multipart/form-data; ") and body.count(f"--{boundary}\r\n".encode()) == 2
    assert body.endswith(f"--{boundary}--\r\n".encode()) and b"\xff\xd8two\r\n" in body
