"""The benchmark's outputs: a JSON file, a Markdown table and a PNG plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def markdown(results: dict[str, Any]) -> str:
    machine = results["machine"]
    lines = [
        f"Run {results['started']} on {machine['cpu']} ({machine['cores']} cores; "
        f"flags {', '.join(machine.get('cpu_flags', [])) or 'none of note'}), "
        f"providers {', '.join(machine['providers'])}, commit `{machine['commit'][:10]}`, "
        f"{'quick' if results['quick'] else 'full'} mode.",
        "",
        "| model | path | concurrency | images/s | p50 ms | p95 ms | p99 ms | errors | mean batch | vs floor "
        "| server CPU ms/image | others' cores |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in results["runs"]:
        batch = "-" if run.get("mean_batch") is None else f"{run['mean_batch']:.1f}"
        floor = "-" if run.get("vs_floor") is None else f"{run['vs_floor']:.2f}"
        cpu = "-" if run.get("server_cpu_ms") is None else f"{run['server_cpu_ms']:.2f}"
        cells = [run["model"], run["path"], run["concurrency"], f"{run['images_per_s']:.1f}"]
        others = "-" if run.get("others_cores") is None else f"{run['others_cores']:.2f}"
        cells += [f"{run[k]:.1f}" for k in ("p50_ms", "p95_ms", "p99_ms")] + [run["errors"], batch, floor, cpu, others]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", "| ratio | value | target | met |", "|---|---|---|---|"]
    for ratio in results["ratios"]:
        met = "-" if ratio["met"] is None else ("yes" if ratio["met"] else "**no**")
        target = "-" if ratio["target"] is None else f">= {ratio['target']}"
        lines.append(f"| {ratio['name']} | {ratio['value']:.2f} | {target} | {met} |")
    lines += recipes(results.get("int8_recipes", {}))
    return "\n".join(lines) + "\n"


def recipes(found: dict[str, Any]) -> list[str]:
    """The INT8 recipes each variant's export timed, as its metadata records them."""
    lines = []
    for model, quantization in found.items():
        flags = ", ".join(quantization["cpu"].get("flags", [])) or "none"
        lines += ["", f"INT8 recipes of `{model}` as its export timed them (INT8 flags: {flags}); kept: "
                  f"**{quantization['recipe']}**, {quantization['choice']}.", "",
                  "| recipe | images/s at batch 1 | at batch 8 | fused INT8 operators | left in float | agreement |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for c in quantization["candidates"]:
            ops = c["ops"]
            fused = ", ".join(f"{n} {op}" for op, n in ops.items() if op.startswith("Q") and op != "QuantizeLinear")
            left = ", ".join(f"{n} {op}" for op, n in ops.items() if op in ("Conv", "FusedConv", "Gemm", "Transpose"))
            lines.append(f"| {c['recipe']} | {c['images_per_s']['1']} | {c['images_per_s']['8']} | {fused} | "
                         f"{left or '-'} | {100 * c['top1_agreement']:.1f}% |")  # fmt: skip
    return lines


def plot(results: dict[str, Any], path: Path) -> None:
    models = sorted({r["model"] for r in results["runs"] if r["path"] != "ceiling"})
    figure, axes = plt.subplots(2, len(models), figsize=(5 * len(models), 8), squeeze=False)
    for column, model in enumerate(models):
        runs = [r for r in results["runs"] if r["model"] == model]
        for path_name in sorted({r["path"] for r in runs if r["path"] != "ceiling"}):
            series = sorted((r for r in runs if r["path"] == path_name), key=lambda r: r["concurrency"])
            x = [r["concurrency"] for r in series]
            axes[0][column].plot(x, [r["images_per_s"] for r in series], marker="o", label=path_name)
            axes[1][column].plot(x, [r["p99_ms"] for r in series], marker="o", label=f"{path_name} p99")
        ceiling = max((r["images_per_s"] for r in runs if r["path"] == "ceiling"), default=None)
        if ceiling:
            axes[0][column].axhline(ceiling, color="black", linestyle="--", label="ONNX Runtime ceiling")
        axes[0][column].set(title=f"{model}: throughput", xlabel="concurrency", ylabel="images/s", xscale="log",
                            yscale="log")  # fmt: skip
        axes[1][column].set(title=f"{model}: p99 latency", xlabel="concurrency", ylabel="ms", xscale="log",
                            yscale="log")  # fmt: skip
        for ax in axes[:, column]:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=80)


def write(results: dict[str, Any], out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "latest.json", "markdown": out / "latest.md", "plot": out / "latest.png"}
    paths["json"].write_text(json.dumps(results, indent=2) + "\n")
    paths["markdown"].write_text(markdown(results))
    plot(results, paths["plot"])
    return paths
