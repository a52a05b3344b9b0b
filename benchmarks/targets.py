"""The ratios a run is judged by: against the stack floor, the ceiling, the peers, FP32, the hardware.

Targets are the performance issue's (#19), each next to its figure in ``latest.md``; a ratio
without a target is reported for what it says.
"""

from __future__ import annotations

from typing import Any

from .load import RunResult

# Multiply-accumulates per cycle and core: FP32 FMA on 2 x 8 lanes (AVX2, or AVX-512 on 256-bit
# units), INT8 with VNNI on 2 x 32 lanes
MAC_PER_CYCLE = {"fp32": 16, "int8": 64}
HTTP_PATHS = ("http", "noop", "floor", "mlserver", "litserve", "baseline", "http-workers1", "http-workers2",
              "http-instances2", "http-shadow1", "http-shadow0.1", "explain-gradcam", "explain-occlusion")  # fmt: skip


def ratio(name: str, value: float, target: float | None) -> dict[str, Any]:
    met = None if target is None else value >= target
    return {"name": name, "value": round(value, 3), "target": target, "met": met}


def best(runs: list[RunResult], model: str, path: str) -> float:
    return max((r.images_per_s for r in runs if r.model == model and r.path == path), default=0.0)


def at(runs: list[RunResult], model: str, path: str, concurrency: int) -> float:
    return next((r.images_per_s for r in runs if (r.model, r.path, r.concurrency) == (model, path, concurrency)), 0.0)


def cpu_at(runs: list[RunResult], model: str, path: str, concurrency: int) -> float:
    """The server's CPU milliseconds per image in that run (0 where not measured)."""
    found = [r.server_cpu_ms for r in runs if (r.model, r.path, r.concurrency) == (model, path, concurrency)]
    return (found[0] or 0.0) if found else 0.0


def vs_floor(runs: list[RunResult]) -> dict[tuple[str, str, int], float]:
    """Every HTTP row's requests/s as a fraction of the stack floor's, same payload and concurrency."""
    out = {}
    for run in runs:
        floor = at(runs, run.model, "floor", run.concurrency)
        if run.path in HTTP_PATHS and floor:
            # four significant figures: a slow network's fraction (ResNet-18 at a few images/s) is not rounded to 0
            out[(run.model, run.path, run.concurrency)] = float(f"{run.requests / run.seconds / floor:.4g}")
    return out


def physical_fraction(images_per_s: float, macs_per_image: float, precision: str, machine: dict[str, Any]) -> float:
    peak = machine["cores"] * machine["clock_ghz"] * 1e9 * MAC_PER_CYCLE[precision]
    return images_per_s * macs_per_image / peak


def high(runs: list[RunResult]) -> int:
    """The concurrency the targets are set at, 16, or the measured one nearest to it (4 in quick runs; 64 where only
    64 ran), the lower of two as near."""
    levels = {r.concurrency for r in runs if r.path == "http"}
    return min(levels, key=lambda c: (abs(c - 16), c)) if levels else 16


def stands_for_16(c: int) -> bool:
    """Whether the targets set at concurrency 16 judge a run at ``c``: 16, or a quick run's 4; not a level above,
    nor 1, which has targets of its own."""
    return 1 < c <= 16


def stack(runs: list[RunResult]) -> list[dict[str, Any]]:
    """The HTTP stack's own price: /noop against 4,500 requests/s and against the floor."""
    c = high(runs)
    noop = at(runs, "lenet5", "noop", c)
    if not noop:
        return []
    name = f"lenet5's service: /noop thousands of requests/s at concurrency {c}"
    out = [ratio(name, noop / 1000, 4.5 if stands_for_16(c) else None)]
    if at(runs, "lenet5", "floor", c):
        value = noop / at(runs, "lenet5", "floor", c)
        out.append(ratio(f"/noop / stack floor at concurrency {c}", value, 0.35 if stands_for_16(c) else None))
    return out


PEER_TARGETS = {("lenet5", 16): 2.0, ("lenet5", 1): 3.0, ("resnet18", 16): 1.2, ("resnet50", 16): 1.05}


def peers(runs: list[RunResult], model: str) -> list[dict[str, Any]]:
    out = []
    for peer in ("mlserver", "litserve"):
        for concurrency in dict.fromkeys((high(runs), 1)):
            theirs, ours = at(runs, model, peer, concurrency), at(runs, model, "http", concurrency)
            if theirs and ours:  # a run of one side only judges nothing
                level = 16 if concurrency == high(runs) and stands_for_16(concurrency) else concurrency
                target = PEER_TARGETS.get((model, level)) if peer == "mlserver" or model == "resnet50" else None
                value = ours / theirs
                out.append(ratio(f"{model} HTTP / {peer} at concurrency {concurrency}", value, target))
        our_cpu, their_cpu = cpu_at(runs, model, "http", high(runs)), cpu_at(runs, model, peer, high(runs))
        if our_cpu and their_cpu:  # the price of an image: the server's CPU time per image
            name = f"{model} server CPU per image, {peer} / ours at concurrency {high(runs)}"
            out.append(ratio(name, their_cpu / our_cpu, None))
    return out


def ceilings(runs: list[RunResult], model: str) -> list[dict[str, Any]]:
    top, c = best(runs, model, "ceiling"), high(runs)
    if not top or not at(runs, model, "http", c) or model.startswith("lenet5"):
        return []
    target = {"resnet50": 0.95, "resnet50_int8": 0.9}.get(model) if stands_for_16(c) else None
    out = [ratio(f"{model} HTTP / in-process ceiling at concurrency {c}", at(runs, model, "http", c) / top, target)]
    if best(runs, model, "ceiling+decode"):
        value = at(runs, model, "http", c) / best(runs, model, "ceiling+decode")
        out.append(ratio(f"{model} HTTP / in-process decode + ceiling at concurrency {c}", value, None))
    if at(runs, model, "grpc-bytes", c) and at(runs, model, "http", c):
        value = at(runs, model, "grpc-bytes", c) / at(runs, model, "http", c)
        target = 1.0 if model == "resnet50" and stands_for_16(c) else None
        out.append(ratio(f"{model} gRPC / HTTP at concurrency {c} (same files)", value, target))
    if cpu_at(runs, model, "grpc-bytes", c) and cpu_at(runs, model, "http", c):  # the client's cost left out
        value = cpu_at(runs, model, "http", c) / cpu_at(runs, model, "grpc-bytes", c)
        out.append(ratio(f"{model} server CPU per image, HTTP / gRPC at concurrency {c}", value, None))
    return out


def int8(runs: list[RunResult], model: str, machine: dict[str, Any]) -> list[dict[str, Any]]:
    variant = f"{model}_int8"
    if not (at(runs, variant, "ceiling", 8) and at(runs, model, "ceiling", 8)):
        return []
    vnni = bool(machine.get("int8", {}).get("vnni"))
    target = (3.0 if vnni else 1.8) if model == "resnet50" else None
    value = at(runs, variant, "ceiling", 8) / at(runs, model, "ceiling", 8)
    with_or_without = "with VNNI" if vnni else "without VNNI"
    return [ratio(f"{variant} / {model} in-process at batch 8 ({with_or_without})", value, target)]


def physical(
    runs: list[RunResult], model: str, macs: dict[str, float], machine: dict[str, Any]
) -> list[dict[str, Any]]:
    precision = "int8" if model.endswith("_int8") else "fp32"
    if model not in macs or not machine.get("clock_ghz") or not at(runs, model, "ceiling", 8):
        return []
    fraction = physical_fraction(at(runs, model, "ceiling", 8), macs[model], precision, machine)
    name = f"{model} in-process batch 8 / physical {precision.upper()} limit"
    return [ratio(f"{name} ({MAC_PER_CYCLE[precision]} MAC/cycle/core at {machine['clock_ghz']} GHz)", fraction, None)]


def ratios(runs: list[RunResult], macs: dict[str, float], machine: dict[str, Any]) -> list[dict[str, Any]]:
    """Every ratio of the run, the targeted ones with their targets."""
    out = stack(runs)
    for model in sorted({r.model for r in runs}):
        if model.startswith("lenet5") and best(runs, model, "noop"):
            value = best(runs, model, "http") / best(runs, model, "noop")
            out.append(ratio(f"{model} HTTP /classify / no-op (requests/s)", value, None))
        out += ceilings(runs, model) + peers(runs, model) + int8(runs, model, machine)
        baseline = best(runs, model, "baseline")
        if baseline:
            target = 2.0 if model == "resnet50" else None
            out.append(ratio(f"{model} service / PyTorch baseline", best(runs, model, "http") / baseline, target))
        out += physical(runs, model, macs, machine) + shadow(runs, model) + explained(runs, model)
    return out


def explained(runs: list[RunResult], model: str) -> list[dict[str, Any]]:
    """An explanation's price: images explained per second against images classified (Grad-CAM at concurrency 4,
    occlusion at 1)."""
    out = []
    for method, c in (("gradcam", 4), ("occlusion", 1)):
        explaining, classifying = at(runs, model, f"explain-{method}", c), at(runs, model, "http", c)
        if explaining and classifying:
            out.append(ratio(f"{model} /explain {method} / /classify images per second at concurrency {c}",
                             explaining / classifying, None))  # fmt: skip
    return out


def shadow(runs: list[RunResult], model: str) -> list[dict[str, Any]]:
    """The primary's throughput with its INT8 variant shadowing a share of its requests, against without."""
    out = []
    c = high(runs)
    for fraction in ("1", "0.1"):
        with_shadow, without = at(runs, model, f"http-shadow{fraction}", c), at(runs, model, "http", c)
        if with_shadow and without:
            name = f"{model} HTTP with a shadow of {fraction} / without at concurrency {c}"
            out.append(ratio(name, with_shadow / without, None))
    return out
