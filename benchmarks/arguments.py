"""What the benchmarks' command lines share, checked before any export (minutes) or run: lists of counts, seconds,
the models they may name."""

from __future__ import annotations

import argparse
from collections.abc import Iterable


def counts(text: str) -> tuple[int, ...]:
    """An argparse type: comma-separated whole numbers of 1 or more (concurrency levels, batch sizes)."""
    try:
        numbers = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not comma-separated whole numbers, e.g. 1,16,64") from None
    if min(numbers) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every number is 1 or more")
    return numbers


def seconds(text: str) -> float:
    """An argparse type: a number of seconds above 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds above 0")
    return value


def models_problem(text: str, known: Iterable[str], variants: Iterable[str] = ()) -> str | None:
    """Why ``--models text`` cannot be benchmarked, or None: it names no model, or one outside ``known`` (a name
    with one of the ``variants`` suffixes, ``_int8``, stands for its parent's variant)."""
    names, known, variants = [m for m in text.split(",") if m], set(known), tuple(variants)
    if not names:
        return "name at least one model"
    parent = {name: next((name.removesuffix(s) for s in variants if name.endswith(s)), name) for name in names}
    if unknown := [name for name in names if name not in known and parent[name] not in known]:
        also = f" (or NAME{', NAME'.join(variants)})" if variants else ""
        return f"unknown {', '.join(unknown)}; choose among {', '.join(sorted(known))}{also}"
    return None
