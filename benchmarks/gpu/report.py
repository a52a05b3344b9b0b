"""The GPU issue's targets judged on a run's figures, and the run as Markdown.

Every target is ``met``, ``not met`` or ``not measured`` (with what is missing), never assumed; in the CPU dry
run each is ``not applicable (cpu dry run)``, its figures still computed where the dry run has them, so that the
judging code runs in CI before a GPU ever sees it. A served run with errors meets no target.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from functools import partial
from typing import Any

DRY = "not applicable (cpu dry run)"
Found = dict[str, Any]
Judged = tuple[str | None, bool | None, str]  # what was measured, in words; met; what it was measured on


def run_at(found: Found, model: str, workers: int, path: str, concurrency: int,
           resolved: bool = False) -> dict[str, Any] | None:  # fmt: skip
    """``model``'s run on ``path`` at ``concurrency`` by the server asked for ``workers`` (``resolved``: by the one
    that ran ``workers``, the service's sizing included)."""
    servers = [s for s in found.get("served", []) if s["model"] == model and not s.get("trial")]
    exact = [s for s in servers if s["workers"] == workers]
    sized = [s for s in servers if resolved and s["workers"] == 0 and s.get("workers_resolved") == workers]
    for server in exact + sized:  # the server asked for that count first
        for run in server["runs"]:
            if (run["path"], run["concurrency"]) == (path, concurrency):
                return dict(run)
    return None


def served_runs(found: Found, model: str, path: str, workers: int | None = None) -> list[dict[str, Any]]:
    servers = [s for s in found.get("served", []) if s["model"] == model and workers in (None, s["workers"])
               and not s.get("trial")]  # fmt: skip
    return [run for server in servers for run in server["runs"] if run["path"] == path]


def ceiling_best(found: Found, model: str, path: str, label: str | None, batches: Callable[[int], bool]) -> Any:
    """The fastest in-process row of ``model`` on ``path`` with ``label``'s options (any where None)."""
    rows = [(run, c) for c in found.get("ceilings", []) if c["model"] == model
            and (label is None or c["options_label"] == label) for run in c["runs"]
            if run["path"] == path and batches(run["batch"])]  # fmt: skip
    return max(rows, key=lambda rc: rc[0]["images_per_s"], default=(None, None))


def http_rate(found: Found, model: str, concurrency: int, floor: float, p99: float | None) -> Judged:
    run = run_at(found, model, 0, "http", concurrency)
    on = f"{model} HTTP JPEG at concurrency {concurrency}, the service's WORKERS sizing"
    if run is None:
        return None, None, on
    words = f"{run['images_per_s']:.0f} images/s, p99 {run['p99_ms']} ms, {run['errors']} errors"
    met = run["errors"] == 0 and run["images_per_s"] >= floor and (p99 is None or run["p99_ms"] <= p99)
    return words, met, on


def grpc_vs_ceiling(found: Found, model: str, max_batch: int) -> Judged:
    runs = [r for r in served_runs(found, model, "grpc-pixels", 0) if r["errors"] == 0]
    top, _ = ceiling_best(found, model, "numpy", "service", lambda b: b <= max_batch)
    on = f"{model} gRPC uint8 (best concurrency) / in-process numpy path, the service's CUDA options, batch <= "
    on += str(max_batch)
    if not runs or top is None:
        return None, None, on
    best = max(runs, key=lambda r: r["images_per_s"])
    value = best["images_per_s"] / top["images_per_s"]
    words = (f"{value:.2f} ({best['images_per_s']:.0f} images/s at c={best['concurrency']} / "
             f"{top['images_per_s']:.0f} at batch {top['batch']})")  # fmt: skip
    return words, value >= 0.7, on


def vs_anchor(found: Found, model: str) -> Judged:
    anchor = found.get("anchor") or {}
    speeds = anchor.get("images_per_s") or {}
    on = f"{model} in-process IOBinding (best options) / PyTorch FP16 at the same batch"
    parts, met = [], []
    for batch, theirs in sorted(speeds.items(), key=lambda kv: -int(kv[0])):
        ours, _ = ceiling_best(found, model, "iobinding", None, partial(operator.eq, int(batch)))
        if ours is not None and theirs:
            value = ours["images_per_s"] / theirs
            parts.append(f"batch {batch}: {value:.2f} ({ours['images_per_s']:.0f} / {theirs:.0f} images/s)")
            met.append(value >= 1.0)
    if not met:
        return None, None, on
    return "; ".join(parts), all(met), on


def lenet_rate(found: Found) -> Judged:
    runs = served_runs(found, "lenet5", "http", 0)
    on = "lenet5 HTTP requests/s (best concurrency), the service's WORKERS sizing"
    if not runs:
        return None, None, on
    best = max(runs, key=lambda r: r["images_per_s"])
    words = f"{best['images_per_s']:.0f} requests/s at c={best['concurrency']}, {best['errors']} errors"
    return words, best["errors"] == 0 and best["images_per_s"] >= 10_000, on


def every_batch(found: Found) -> Judged:
    found_sweep = next((s["sweep"] for s in found.get("served", []) if s.get("sweep")), None)
    if not found_sweep:
        return None, None, "the every-batch-size run"
    s = found_sweep
    worst = s.get("worst_size") or {}  # a size's own p99 / p50: larger requests take longer whatever the shapes
    words = (f"largest p99 {s['largest_p99_ms']} ms (at {s['largest_p99_at']} images) / p50 {s['p50_ms']} ms = "
             f"{s['ratio']} (the worst size's own: {worst.get('ratio')} at {worst.get('images')} images); "
             f"{s['sizes_covered']} of {s['sizes_wanted']} sizes, {s['errors']} errors")  # fmt: skip
    on = f"every batch size 1..{s['max_batch']} at concurrency 1 ({s['requests']} requests)"
    return words, s["errors"] == 0 and s["sizes_covered"] == s["sizes_wanted"] and s["ratio"] <= 3.0, on


def scaling(found: Found, model: str | None, workers: list[int], concurrency: int) -> Judged:
    on = f"{model} HTTP at concurrency {concurrency}, WORKERS {', '.join(map(str, workers))}"
    runs = {w: run_at(found, model, w, "http", concurrency, resolved=True) for w in workers} if model else {}
    if not runs or any(r is None for r in runs.values()):
        return None, None, on
    words = ", ".join(f"WORKERS={w}: {r['images_per_s']:.0f} images/s" for w, r in runs.items() if r)
    one = runs[1]["images_per_s"]  # type: ignore[index]
    met = all(r is not None and r["errors"] == 0 and r["images_per_s"] >= one for r in runs.values())
    return words, met, on


def targets(found: Found) -> list[dict[str, Any]]:
    """Each target with what was measured and its status."""
    plan = found["plan"]
    workers = sorted({1, *plan["scaling_workers"]})
    judged = [
        ("HTTP JPEG FP16: >= 4000 images/s, p99 <= 100 ms at c128", http_rate(found, "resnet50_fp16", 128, 4000, 100)),
        ("HTTP JPEG FP32: >= 3500 images/s, p99 <= 100 ms at c128", http_rate(found, "resnet50", 128, 3500, 100)),
        ("gRPC uint8 FP16 >= 0.7 x in-process ceiling", grpc_vs_ceiling(found, "resnet50_fp16", plan["max_batch"])),
        ("in-process FP16 >= 1.0 x PyTorch anchor", vs_anchor(found, "resnet50_fp16")),
        ("LeNet-5 HTTP >= 10000 requests/s", lenet_rate(found)),
        ("every-batch-size run: largest p99 <= 3 x p50", every_batch(found)),
        ("WORKERS 2 and 4 >= WORKERS 1", scaling(found, plan["scaling_model"], workers, plan["scaling_concurrency"])),
    ]
    out = []
    for name, (measured, met, on) in judged:
        if plan["providers"] == "cpu":
            status = DRY
        elif measured is None or met is None:
            status = "not measured"
        else:
            status = "met" if met else "not met"
        out.append({"target": name, "measured": measured, "on": on, "status": status})
    return out


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def row(cells: list[Any]) -> str:
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def header(found: Found) -> list[str]:
    machine, gpu = found["machine"], found["gpu"]
    if gpu.get("available"):
        gpu_words = f"**{gpu['name']}** ({gpu['memory_total_mib']} MiB, driver {gpu['driver']})"
    else:
        gpu_words = f"no GPU ({gpu.get('reason')})"
    mode = "CPU dry run" if found["plan"]["providers"] == "cpu" else "GPU run"
    return [
        "# GPU benchmark", "",
        f"{mode} {found['started']}, {found.get('seconds', '?')} s, on {gpu_words} and **{machine['cpu']}** "
        f"({machine['cores']} cores; flags {', '.join(machine['cpu_flags']) or 'none of note'}); "
        f"`--providers {found['plan']['providers']}`, onnxruntime {machine['onnxruntime']} "
        f"({', '.join(found['providers_available'])}), commit `{machine['commit'][:10]}`.",
        "" if found.get("complete") else "\n**Incomplete**: the run stopped before its end.",
    ]  # fmt: skip


def markdown(found: Found) -> str:
    lines = header(found)
    lines += ["## Targets", "", "| target | measured | on | status |", "|---|---|---|---|"]
    lines += [f"| {t['target']} | {_cell(t['measured'])} | {t['on']} | {t['status']} |" for t in found["targets"]]
    lines += ["", "## In-process (ONNX Runtime)", "",
              "| model | options | provider | path | batch | images/s | p50 ms | p99 ms | first call ms |",
              "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for c in found.get("ceilings", []):
        options = c["provider_options"]
        shown = ", ".join(f"{k}={options[k]}" for k in ("cudnn_conv_algo_search", "prefer_nhwc") if k in options)
        label = f"{c['options_label']}" + (f" ({shown})" if shown else "")
        for r in c["runs"]:
            cells = [c["model"], label, c["providers_taken"][0], r["path"], r["batch"], f"{r['images_per_s']:.1f}",
                     r["p50_ms"], r["p99_ms"], "-" if r["first_call_ms"] is None else r["first_call_ms"]]  # fmt: skip
            lines.append(row(cells))
        if c.get("cuda_graph_error"):  # CUDA_GRAPHS=on could not run: the other paths' figures stand
            lines.append(row([c["model"], label, c["providers_taken"][0], "cuda-graph", "-",
                              "failed: " + c["cuda_graph_error"], "-", "-", "-"]))  # fmt: skip
        for e in c.get("errors", []):  # a batch size that failed (out of GPU memory, say): no figure, its reason
            lines.append(row([c["model"], label, c["providers_taken"][0], "-", e["batch"], "failed: " + e["error"],
                              "-", "-", "-"]))  # fmt: skip
    anchor = found.get("anchor") or {}
    lines += ["", "## PyTorch anchor", ""]
    if anchor.get("images_per_s"):
        lines += [f"torch {anchor['torch']}, CUDA {anchor['cuda']}, cuDNN {anchor['cudnn']}: {anchor['setup']}.", "",
                  "| batch | images/s | p50 ms | p99 ms |", "|---|---|---|---|"]  # fmt: skip
        lines += [f"| {r['batch']} | {r['images_per_s']:.1f} | {r['p50_ms']} | {r['p99_ms']} |" for r in anchor["runs"]]
    else:
        lines.append(f"Not measured: {anchor.get('reason', 'the stage did not run')}.")
    lines += served(found) + graphs(found) + decode(found)
    for kind in ("skipped", "failures"):
        if found.get(kind):
            lines += ["", f"## {kind.capitalize()}", ""] + [f"- {stage}: {why}" for stage, why in found[kind].items()]
    return "\n".join(lines) + "\n"


def served(found: Found) -> list[str]:
    lines = ["", "## Served (the real service, pure-Python load)", "",
             "| server | path | concurrency | images/s | p50 ms | p99 ms | errors / requests | mean batch | GPU busy % "
             "| server cores | client cores |", "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    sweeps = []
    for server in found.get("served", []):
        shared = ", one session host" if server.get("session_host") else ""
        trial = "".join(f" {k}={v}" for k, v in (server.get("trial") or {}).items())
        label = (f"{server['model']} WORKERS={server['workers']}{trial} ({server.get('workers_resolved', '?')} "
                 f"running{shared})")  # fmt: skip
        for r in server["runs"]:
            cells = [label, r["path"], r["concurrency"], f"{r['images_per_s']:.1f}", r["p50_ms"], r["p99_ms"],
                     f"{r['errors']} / {r['requests']}", r["mean_batch"], r["gpu_busy_mean_pct"], r["server_cores"],
                     r["client_cores"]]  # fmt: skip
            lines.append(row(cells))
        if server.get("sweep"):
            sweeps.append(sweep_words(label, server["sweep"]))
    return lines + [line for words in sweeps for line in ("", words)]


def graphs(found: Found) -> list[str]:
    """CUDA_GRAPHS=on beside the service's default, in-process (its path against the numpy path at each batch) and
    served (its server against the default one at the same concurrency): what its default is to be chosen by."""
    lines = []
    for c in found.get("ceilings", []):
        plain = {r["batch"]: r["images_per_s"] for r in c["runs"] if r["path"] == "numpy"}
        for r in c["runs"]:
            if r["path"] in ("cuda-graph", "fixed-buffers") and plain.get(r["batch"]):
                lines.append(f"- {c['model']} in-process, batch {r['batch']}: {r['images_per_s']:.0f} images/s "
                             f"({r['path']}) against {plain[r['batch']]:.0f} (numpy), "
                             f"{r['images_per_s'] / plain[r['batch']]:.2f}x")  # fmt: skip
        if c.get("cuda_graph_error"):
            lines.append(f"- {c['model']} in-process: CUDA graphs failed: {c['cuda_graph_error']}")
    for server in found.get("served", []):
        if not server.get("trial"):
            continue
        for r in server["runs"]:
            default = run_at(found, server["model"], server["workers"], r["path"], r["concurrency"])
            against = "no run with the defaults to compare" if default is None else (
                f"{default['images_per_s']:.0f} with the defaults, {r['images_per_s'] / default['images_per_s']:.2f}x"
                if default["images_per_s"] else "the defaults' run served nothing")  # fmt: skip
            lines.append(f"- {server['server']} served {r['path']} c={r['concurrency']}: {r['images_per_s']:.0f} "
                         f"images/s, p99 {r['p99_ms']} ms, {r['errors']} errors; {against}")  # fmt: skip
    return ["", "## CUDA graphs", "", *lines] if lines else []


def sweep_words(label: str, s: dict[str, Any]) -> str:
    worst = s["worst_size"]
    busy = "" if s["gpu_busy_mean_pct"] is None else f" GPU {s['gpu_busy_mean_pct']}% busy."
    return (f"Every batch size on {label}: {s['requests']} requests of 1 to {s['max_batch']} images at concurrency 1 "
            f"({s['sizes_covered']} of {s['sizes_wanted']} sizes, {s['errors']} errors; one ONNX Runtime call per "
            f"request: {s['one_batch_per_request']}): p50 {s['p50_ms']} ms, largest p99 {s['largest_p99_ms']} ms at "
            f"{s['largest_p99_at']} images, ratio {s['ratio']}; the size with the largest p99 / p50 of its own: "
            f"{worst['images']} images, {worst['p99_ms']} / {worst['p50_ms']} ms.{busy}")  # fmt: skip


def decode(found: Found) -> list[str]:
    d = found.get("decode")
    if not d:
        return []
    cores = found["machine"]["cores"]
    return ["", "## CPU JPEG decode", "",
            f"One core decodes, resizes to {d['resize']} and crops to {d['to'][0]} the benchmark's JPEG bodies "
            f"({', '.join(str(b) for b in d['file_bytes'])} bytes) at **{d['images_per_s_per_core']:.0f} images/s** "
            f"(p50 {d['p50_ms']} ms); {cores} cores at most {d['images_per_s_per_core'] * cores:.0f} images/s, "
            "before the HTTP stack and the load generator take their share."]  # fmt: skip
