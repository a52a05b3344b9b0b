"""Generates grafana/dashboards/cnn-serving.json: ``python monitoring/dashboard.py`` (``make dashboard``).

Each panel is a title, a unit and PromQL expressions; ``$job`` is the scrape job (whatever
name a Prometheus gives it: ``cnn-serving`` in docker-compose, the Service's name under the
Prometheus Operator), ``$model`` the dashboard's model selector and ``$__rate_interval``
Grafana's rate window. A test runs every expression against a real Prometheus scraping the
real service.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).parent / "grafana" / "dashboards" / "cnn-serving.json"
JOB = 'job=~"$job"'
M = JOB + ',model=~"$model"'
ERRORS = M + ',outcome=~"4xx|5xx"'
RATE = "$__rate_interval"


def rate(metric: str, selector: str = M) -> str:
    return f"rate({metric}{{{selector}}}[{RATE}])"


def quantile(q: float, metric: str, by: str) -> str:
    return f"histogram_quantile({q}, sum by (le, {by}) ({rate(metric + '_bucket')}))"


def mean(metric: str, by: str) -> str:
    return f"sum by ({by}) ({rate(metric + '_sum')}) / sum by ({by}) ({rate(metric + '_count')})"


ERROR_RATIO = f"sum({rate('cnn_requests_total', ERRORS)}) / sum({rate('cnn_requests_total')})"
HTTP_REQUESTS = f"sum by (route, code) ({rate('cnn_http_requests_total', JOB)})"
UNDER_HALF = M + ',le="0.5"'
UNSURE = (f"sum by (model, version) ({rate('cnn_prediction_confidence_bucket', UNDER_HALF)})"
          f" / sum by (model, version) ({rate('cnn_prediction_confidence_count')})")  # fmt: skip

# (title, unit, [(legend, expression)], width)
PANELS: list[tuple[str, str, list[tuple[str, str]], int]] = [
    ("Throughput per model", "img/s", [("{{model}}", f"sum by (model) ({rate('cnn_images_total')})")], 12),
    ("Throughput per protocol", "img/s",
     [("{{model}} {{protocol}}", f"sum by (model, protocol) ({rate('cnn_images_total')})")], 12),
    ("Requests by outcome", "reqps", [("{{outcome}}", f"sum by (outcome) ({rate('cnn_requests_total')})")], 8),
    ("Error ratio", "percentunit", [("4xx + 5xx", ERROR_RATIO)], 8),
    ("Requests in flight", "short", [("{{protocol}}", f"sum by (protocol) (cnn_requests_in_flight{{{JOB}}})")], 8),
    ("Latency percentiles per model", "s", [
        (f"p{int(q * 100)} {{{{model}}}}", quantile(q, "cnn_request_seconds", "model")) for q in (0.5, 0.95, 0.99)
    ], 12),
    ("Stage time (mean)", "s", [("{{stage}}", mean("cnn_stage_seconds", "stage"))], 12),
    ("Stage time (p95)", "s", [("{{stage}}", quantile(0.95, "cnn_stage_seconds", "stage"))], 8),
    ("Batch size (mean images per call)", "short", [("{{model}}", mean("cnn_batch_size", "model"))], 8),
    ("Requests per batch (mean)", "short", [("{{model}}", mean("cnn_batch_requests", "model"))], 8),
    ("Process CPU", "percentunit",
     [("{{instance}}", f"sum by (instance) (rate(process_cpu_seconds_total{{{JOB}}}[{RATE}]))")], 8),
    ("Process memory", "bytes", [("{{instance}}", f"sum by (instance) (process_resident_memory_bytes{{{JOB}}})")], 8),
    ("Models ready", "short", [("{{model}} v{{version}}", f"cnn_model_ready{{{M}}}"),
                               ("{{model}} on {{provider}}", f"cnn_model_info{{{M}}}")], 8),
    ("Model load and warm-up", "s", [("{{model}} {{phase}}", f"cnn_model_load_seconds{{{M}}}")], 12),
    ("HTTP requests by route and status", "reqps", [("{{route}} {{code}}", HTTP_REQUESTS)], 12),
    # is the model still right?
    ("Prediction drift from the baseline (alert above 0.1)", "short",
     [("{{model}} v{{version}} {{kind}}", f"max by (model, version, kind) (cnn_prediction_drift{{{M}}})")], 8),
    ("Top-1 confidence (p10, median)", "percentunit", [
        (f"p{int(q * 100)} {{{{model}}}} v{{{{version}}}}", quantile(q, "cnn_prediction_confidence", "model, version"))
        for q in (0.1, 0.5)
    ], 8),
    ("Answers with top-1 under 0.5", "percentunit", [("{{model}} v{{version}}", UNSURE)], 8),
]  # fmt: skip


def panel(index: int, title: str, unit: str, targets: list[tuple[str, str]], width: int, x: int, y: int) -> dict:
    return {
        "id": index + 1,
        "type": "timeseries",
        "title": title,
        "datasource": {"type": "prometheus", "uid": "prometheus"},
        "gridPos": {"h": 8, "w": width, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
        "targets": [
            {"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend}
            for i, (legend, expr) in enumerate(targets)
        ],
    }


def variable(name: str, values: str, multi: bool) -> dict[str, Any]:
    """A selector filled from a label's values, with "All" (any value) first and chosen."""
    return {
        "name": name,
        "label": name.capitalize(),
        "type": "query",
        "datasource": {"type": "prometheus", "uid": "prometheus"},
        "query": {"query": values, "refId": f"{name}s"},
        "definition": values,
        "refresh": 2,
        "includeAll": True,
        "multi": multi,
        "allValue": ".*",
        "current": {"text": "All", "value": "$__all"},
    }


def dashboard() -> dict[str, Any]:
    panels, x, y = [], 0, 0
    for index, (title, unit, targets, width) in enumerate(PANELS):
        if x + width > 24:
            x, y = 0, y + 8
        panels.append(panel(index, title, unit, targets, width, x, y))
        x += width
    return {
        "uid": "cnn-serving",
        "title": "CNN serving",
        "tags": ["cnn-serving"],
        "timezone": "browser",
        "schemaVersion": 39,
        "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "templating": {
            "list": [
                variable("job", "label_values(cnn_model_ready, job)", multi=False),
                variable("model", 'label_values(cnn_model_ready{job=~"$job"}, model)', multi=True),
            ]
        },
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
