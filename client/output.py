"""Writing results as a table (for people), JSON lines or CSV (for programs)."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from typing import TextIO

from .api import Result

Writer = Callable[[Result], None]


def table_writer(stream: TextIO, top_k: int, sources: Sequence[str], explain: bool = False) -> Writer:
    """Path, model and version, then the predictions, best first; columns aligned as rows stream out; with
    ``explain``, the heat map's file or why there is none."""
    width = min(max((len(s) for s in sources), default=0), 60)

    def write(result: Result) -> None:
        if not result.ok:
            stream.write(f"{result.source:<{width}}  FAILED  {result.error}\n")
            return
        shown = ", ".join(f"{p.label} {p.score:.1%}" for p in result.predictions[:top_k])
        heat = f"  [{result.explanation}]" if explain and result.explanation is not None else ""
        stream.write(f"{result.source:<{width}}  {result.model} v{result.version}  {shown}{heat}\n")

    return write


def jsonl_writer(stream: TextIO, top_k: int, sources: Sequence[str], explain: bool = False) -> Writer:
    def write(result: Result) -> None:
        stream.write(json.dumps(result.to_dict(), ensure_ascii=False) + "\n")

    return write


def csv_writer(stream: TextIO, top_k: int, sources: Sequence[str], explain: bool = False) -> Writer:
    """One row per file: path, model, version, error, then label/index/score for each rank; with ``explain``, a
    last column: the heat map's file or why there is none."""
    rows = csv.writer(stream)
    ranks = [f"{name}_{rank}" for rank in range(1, top_k + 1) for name in ("label", "index", "score")]
    rows.writerow(["path", "model", "version", "error", *ranks, *(["explanation"] if explain else [])])

    def write(result: Result) -> None:
        cells = [cell for p in result.predictions for cell in (p.label, p.index, repr(p.score))]
        cells += [""] * (len(ranks) - len(cells))
        cells += [result.explanation or ""] if explain else []
        rows.writerow([result.source, result.model or "", result.version or "", result.error or "", *cells])

    return write


WRITERS: dict[str, Callable[..., Writer]] = {
    "table": table_writer,
    "jsonl": jsonl_writer,
    "csv": csv_writer,
}
