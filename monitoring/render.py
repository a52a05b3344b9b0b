"""Draws the Grafana dashboard's panels from a Prometheus, as a PNG (docs/dashboard.png, for the documentation).

Grafana itself does not run where this is built, so the picture is rendered from the
dashboard's own JSON: the same panels, queries, legends and units, over a time range::

    python monitoring/render.py --prometheus http://127.0.0.1:9090 --minutes 5 --out docs/dashboard.png
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from pathlib import Path
from typing import Any

import httpx
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

DASHBOARD = Path(__file__).parent / "grafana" / "dashboards" / "cnn-serving.json"


def query_range(prometheus: str, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
    params = {"query": expr, "start": start, "end": end, "step": step}
    response = httpx.get(f"{prometheus}/api/v1/query_range", params=params, timeout=30).json()
    return response["data"]["result"] if response.get("status") == "success" else []


def legend(template: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template).strip() or "value"


def render(
    prometheus: str, minutes: float, out: Path, rate_window: str = "30s", panels_like: str = "", title: str = ""
) -> None:
    """The panels whose title matches ``panels_like`` (all by default), over the last ``minutes``."""
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if re.search(panels_like, p["title"])]
    end = time.time()
    start, step = end - minutes * 60, max(1.0, minutes * 60 / 200)
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(6 * columns, 3.2 * rows), squeeze=False)
    figure.suptitle(title or f"{dashboard['title']} (model = All; rendered from the dashboard's queries)", fontsize=14)
    for ax, panel in zip(axes.ravel(), panels, strict=False):
        for target in panel["targets"]:
            expr = target["expr"].replace("$job", ".*").replace("$model", ".*").replace("$__rate_interval", rate_window)
            for series in query_range(prometheus, expr, start, end, step):
                points = [(float(t) - end, float(v)) for t, v in series["values"] if v not in ("NaN", "+Inf", "-Inf")]
                if points:
                    xs, ys = zip(*points, strict=True)
                    ax.plot([x / 60 for x in xs], ys, label=legend(target["legendFormat"], series["metric"]))
        ax.set_title(f"{panel['title']} [{panel['fieldConfig']['defaults']['unit']}]", fontsize=10)
        ax.set_xlabel("minutes", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7, loc="upper left")
    for ax in axes.ravel()[len(panels) :]:
        ax.set_visible(False)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=80)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090")
    parser.add_argument("--minutes", type=float, default=5)
    parser.add_argument("--out", type=Path, default=Path("docs/dashboard.png"))
    parser.add_argument("--panels", default="", help="only the panels whose title matches this regular expression")
    args = parser.parse_args()
    render(args.prometheus, args.minutes, args.out, panels_like=args.panels)


if __name__ == "__main__":
    main()
