"""What the benchmarks' command lines share: the models they may name, checked before any export (minutes)."""

from __future__ import annotations

from collections.abc import Iterable


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
