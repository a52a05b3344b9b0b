"""Generates grafana/dashboards/cnn-serving.json: ``python monitoring/dashboard.py`` (``make dashboard``).

Built with Grafana's own dashboards-as-code SDK (``grafana-foundation-sdk``), so panels,
variables and units follow Grafana's schema by construction.

Each panel is a title, a unit and PromQL expressions; ``$job`` is the scrape job (whatever
name a Prometheus gives it: ``cnn-serving`` in docker-compose, the Service's name under the
Prometheus Operator), ``$model`` the dashboard's model selector and ``$__rate_interval``
Grafana's rate window. A test runs every expression against a real Prometheus scraping the
real service.
"""

from __future__ import annotations

from pathlib import Path

from grafana_foundation_sdk.builders.common import VizLegendOptions
from grafana_foundation_sdk.builders.dashboard import Dashboard as DashboardBuilder
from grafana_foundation_sdk.builders.dashboard import QueryVariable
from grafana_foundation_sdk.builders.prometheus import Dataquery
from grafana_foundation_sdk.builders.timeseries import Panel
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import LegendDisplayMode, LegendPlacement
from grafana_foundation_sdk.models.dashboard import DataSourceRef, GridPos, VariableOption, VariableRefresh

OUT = Path(__file__).parent / "grafana" / "dashboards" / "cnn-serving.json"
JOB = 'job=~"$job"'
M = JOB + ',model=~"$model"'
ERRORS = M + ',outcome=~"4xx|5xx"'
RATE = "$__rate_interval"
# series that exist only where a setting turns their feature on (their panels read "No data" elsewhere)
FEATURES = {"cnn_canary_": "CANARY", "cnn_cache_": "RESPONSE_CACHE_MB"}


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
LOADED = M + ',action="load",outcome="success"'
LOADS = f"sum by (model) ({rate('cnn_model_changes_total', LOADED)})"
HITS, MISSES = rate("cnn_cache_hits_total"), rate("cnn_cache_misses_total")
CACHE_HIT_RATIO = f"sum by (model) ({HITS}) / (sum by (model) ({HITS}) + sum by (model) ({MISSES}))"
UNFAMILIAR = (f"sum by (model, version) ({rate('cnn_prediction_atypical_total')})"
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
    ("Workers died (OOM killer, SIGKILL, crash) per 30 minutes", "short",
     [("{{instance}}", f"sum by (instance) (increase(cnn_worker_deaths_total{{{JOB}}}[30m]))")], 8),
    ("Models ready", "short", [("{{model}} v{{version}}", f"cnn_model_ready{{{M}}}"),
                               ("{{model}} on {{provider}}", f"cnn_model_info{{{M}}}")], 8),
    ("Model load and warm-up", "s", [("{{model}} {{phase}}", f"cnn_model_load_seconds{{{M}}}")], 12),
    # what each model holds, and serving the whole store on demand (MODEL_CONTROL=on-demand)
    ("Resident memory per model (what its load added)", "bytes",
     [("{{model}} v{{version}}", f"sum by (model, version) (cnn_model_resident_bytes{{{M}}})")], 8),
    ("Loads, evictions and budget refusals", "ops", [
        ("loads {{model}}", LOADS),
        ("evictions {{model}} ({{reason}})", f"sum by (model, reason) ({rate('cnn_model_evictions_total')})"),
        ("refused {{model}}", f"sum by (model) ({rate('cnn_budget_exhausted_total')})"),
    ], 8),
    ("Cold start: load and warm-up until it answers (p95)", "s",
     [("{{model}}", quantile(0.95, "cnn_cold_start_seconds", "model"))], 8),
    ("HTTP requests by route and status", "reqps", [("{{route}} {{code}}", HTTP_REQUESTS)], 12),
    # is the model still right?
    ("Prediction drift from the baseline (alert above 0.1)", "short",
     [("{{model}} v{{version}} {{kind}}", f"max by (model, version, kind) (cnn_prediction_drift{{{M}}}) >= 0")], 8),
    ("Top-1 confidence (p10, median)", "percentunit", [
        (f"p{int(q * 100)} {{{{model}}}} v{{{{version}}}}", quantile(q, "cnn_prediction_confidence", "model, version"))
        for q in (0.1, 0.5)
    ], 8),
    ("Unsure answers (top-1 under 0.5) and unfamiliar images", "percentunit",
     [("unsure {{model}} v{{version}}", UNSURE), ("unfamiliar {{model}} v{{version}}", UNFAMILIAR)], 8),
    # a canary's way from its first share to promotion (or its rollback), and the response cache
    ("Canary: share the candidate answers, and its state", "percentunit", [
        ("{{primary}} → {{candidate}}", f"max by (primary, candidate) (cnn_canary_fraction{{{JOB}}})"),
        ("{{primary}} → {{candidate}} {{state}}",
         f"max by (primary, candidate, state) (cnn_canary_state{{{JOB}}}) == 1"),
    ], 8),
    ("Canary: requests for the primary, by the side that answered", "reqps",
     [("{{primary}}: {{side}}", f"sum by (primary, side) ({rate('cnn_canary_requests_total', JOB)})")], 8),
    ("Response cache: hit ratio and size", "percentunit", [
        ("hits {{model}}", CACHE_HIT_RATIO),
        ("MiB held / 1024", f"sum(cnn_cache_bytes{{{JOB}}}) / 2^30"),
    ], 8),
]  # fmt: skip


PROMETHEUS = DataSourceRef(type_val="prometheus", uid="prometheus")


def panel(index: int, title: str, unit: str, targets: list[tuple[str, str]], width: int, x: int, y: int) -> Panel:
    built = (
        Panel().id(index + 1).title(title).unit(unit).datasource(PROMETHEUS)
        .grid_pos(GridPos(h=8, w=width, x=x, y=y))
        .legend(VizLegendOptions().display_mode(LegendDisplayMode.LIST).placement(LegendPlacement.BOTTOM)
                .show_legend(True))
    )  # fmt: skip
    for i, (legend, expr) in enumerate(targets):
        built = built.with_target(Dataquery().ref_id(chr(ord("A") + i)).expr(expr).legend_format(legend))
    return built


def variable(name: str, values: str, multi: bool) -> QueryVariable:
    """A selector filled from a label's values, with "All" (any value) first and chosen."""
    return (
        QueryVariable(name).label(name.capitalize()).datasource(PROMETHEUS)
        .query({"query": values, "refId": f"{name}s"})
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).include_all(True).multi(multi).all_value(".*")
        .current(VariableOption(text="All", value="$__all"))
    )  # fmt: skip


def dashboard() -> DashboardBuilder:
    built = (
        DashboardBuilder("CNN serving").uid("cnn-serving").tags(["cnn-serving"]).timezone("browser")
        .refresh("10s").time("now-30m", "now")
        .with_variable(variable("job", "label_values(cnn_model_ready, job)", multi=False))
        .with_variable(variable("model", 'label_values(cnn_model_ready{job=~"$job"}, model)', multi=True))
    )  # fmt: skip
    x, y = 0, 0
    for index, (title, unit, targets, width) in enumerate(PANELS):
        if x + width > 24:
            x, y = 0, y + 8
        built = built.with_panel(panel(index, title, unit, targets, width, x, y))
        x += width
    return built


def render() -> str:
    return JSONEncoder(sort_keys=True, indent=2).encode(dashboard().build()) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
