"""``python -m benchmarks``: measure the service against its ceiling, its transport and a baseline."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from service.store.layout import ModelStore

from .arguments import counts, models_problem, seconds
from .report import write
from .run import SHADOW_MODELS, Plan, run

DEFAULT_MODELS = ("lenet5", "resnet18", "resnet50", "resnet50_int8")
VARIANT_SUFFIXES = {"_int8": "int8", "_fp16": "fp16"}


def ensure_models(store: ModelStore, models: tuple[str, ...], quick: bool) -> None:
    """Export what the store lacks: LeNet-5 trained, ImageNet networks with their weights if cached, else random."""
    from export.pipeline import ExportOptions, export_model
    from export.weights import WeightsUnavailableError

    for name in sorted(models, key=lambda n: n.endswith(tuple(VARIANT_SUFFIXES))):  # variants after their parents
        if store.latest(name) is not None:
            continue
        variant = next((suffix for suffix in VARIANT_SUFFIXES if name.endswith(suffix)), None)
        if variant is not None:
            export_variant_for_bench(store, name.removesuffix(variant), VARIANT_SUFFIXES[variant], quick)
            continue
        epochs = 2 if quick else 40
        try:
            export_model(name, store, ExportOptions(epochs=epochs, progress=False))
        except WeightsUnavailableError:
            logging.getLogger("benchmarks").info("%s: no real weights here, benchmarking random ones", name)
            export_model(name, store, ExportOptions(weights="random", progress=False))


def export_variant_for_bench(store: ModelStore, parent: str, precision: str, quick: bool) -> None:
    """The variant; forced where the parent has random weights (no agreement to speak of), and said so. Quick:
    each INT8 recipe timed for a moment only (the choice among them is then a rough one)."""
    from export.precision import VariantOptions, export_variant

    ensure_models(store, (parent,), quick)
    latest = store.latest(parent)
    assert latest is not None
    random_weights = latest.read_metadata()["weights"]["kind"] == "random"
    if random_weights:
        logging.getLogger("benchmarks").info("%s has random weights: its %s variant is forced", parent, precision)
    options = VariantOptions(precision, force=random_weights)  # type: ignore[arg-type]
    export_variant(parent, store, dataclasses.replace(options, timing_seconds=0.2) if quick else options)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated (default: %(default)s)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="short runs at concurrency 1 and 4: the code end to end, not figures to quote",
    )
    parser.add_argument(
        "--store", type=Path, default=Path("benchmarks/.store"), help="model store; what it lacks is exported into it"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="where the results go")
    parser.add_argument("--paths", type=_paths, help=f"only these: {','.join(Plan.paths)}")
    parser.add_argument(
        "--concurrency",
        type=counts,
        help="comma-separated concurrency levels (default 1,4,16,64, peers and layouts 1,16,64; quick 1,4)",
    )
    parser.add_argument("--seconds", type=seconds, help="time bound of each run")
    parser.add_argument(
        "--env", action="append", type=_setting, default=[], metavar="KEY=VALUE", help="a service setting to try"
    )
    args = parser.parse_args(argv)
    from export.registry import list_models

    known = (*list_models(), *ModelStore(args.store).names())
    if problem := models_problem(args.models, known, VARIANT_SUFFIXES):  # before any export: those take minutes
        parser.error(f"--models {args.models}: {problem}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    models = tuple(m for m in args.models.split(",") if m)
    store = ModelStore(args.store)
    plan = Plan.make(models, args.quick)
    if args.paths:
        plan = dataclasses.replace(plan, paths=args.paths)
    shadows = tuple(f"{m}_int8" for m in models if m in SHADOW_MODELS) if "shadow" in plan.paths else ()
    ensure_models(store, models + tuple(s for s in shadows if s not in models), args.quick)
    if args.concurrency:
        plan = dataclasses.replace(plan, concurrency=args.concurrency, peer_concurrency=args.concurrency)
    if args.seconds is not None:
        plan = dataclasses.replace(plan, seconds=args.seconds)
    if args.env:
        plan = dataclasses.replace(plan, service_env=tuple(args.env))
    results = run(store, plan)
    paths = write(results, args.out)
    logging.getLogger("benchmarks").info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return 0


def _paths(text: str) -> tuple[str, ...]:
    paths = tuple(text.split(","))
    if unknown := [path for path in paths if path not in Plan.paths]:
        raise argparse.ArgumentTypeError(f"{', '.join(map(repr, unknown))}: choose among {','.join(Plan.paths)}")
    return paths


def _setting(text: str) -> tuple[str, str]:
    key, equals, value = text.partition("=")
    if not (key and equals):
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE (a service setting, e.g. WORKERS=2)")
    return key, value


if __name__ == "__main__":
    sys.exit(main())
