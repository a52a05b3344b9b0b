"""MkDocs hook: the documentation's reference tables, generated from the code at every build.

A page asks for one with a marker alone on its line, ``<!-- generated: NAME -->``, where NAME is
a key of :data:`GENERATORS`; an unknown name fails the build. The settings come from the pydantic
settings, the metrics from their declarations, the HTTP API from the app's OpenAPI document, the
gRPC API from the ``.proto``, the command lines from their ``--help``, the alerts from
``monitoring/alerts.yml``, the model table from the export registry: nothing here is written
twice, so nothing can drift. ``tests/test_docs.py`` imports these functions too.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # the project's packages, also where it is not installed
    sys.path.insert(0, str(ROOT))

MARKER = re.compile(r"^<!-- generated: ([a-z-]+) -->$", re.M)
# files outside docs/ that pages show, published under the same path (benchmarks.md links them)
PUBLISHED = ("benchmarks/results/*.png", "benchmarks/results/*.svg")


def _cell(text: Any) -> str:
    """One Markdown table cell: pipes escaped, lines joined."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


# --- settings ---------------------------------------------------------------------------------------


def _default(value: Any) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, bool):  # as the environment spells it
        return f"`{str(value).lower()}`"
    if value in ("", ()):
        return "(empty)"
    return f"`{value}`"


def _number(value: float) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:g}"


def accepted(field: Any) -> str:
    """What a setting takes, from its type and bounds: `a`, `b` for a choice, `1 to 1024`, `>= 0`, `> 0`;
    empty where only its description can say (a list, a pattern)."""
    import typing

    if typing.get_origin(field.annotation) is typing.Literal:
        return ", ".join(f"`{choice}`" for choice in typing.get_args(field.annotation))
    if field.annotation is bool:
        return "`true`, `false`"
    bounds = {name: getattr(item, name) for item in field.metadata for name in ("ge", "gt", "le", "lt")
              if getattr(item, name, None) is not None}  # fmt: skip
    low = next(((op, bounds[key]) for key, op in (("ge", ">="), ("gt", ">")) if key in bounds), None)
    high = next(((op, bounds[key]) for key, op in (("le", "<="), ("lt", "<")) if key in bounds), None)
    if low and high and low[0] == ">=" and high[0] == "<=":
        return f"{_number(low[1])} to {_number(high[1])}"
    return ", ".join(f"{bound[0]} {_number(bound[1])}" for bound in (low, high) if bound)


def settings() -> list[tuple[str, str, str, str]]:
    """Every setting: its environment variable, default, what it takes and description (from ``service.settings``)."""
    from service.settings import Settings

    return [
        (name.upper(), _default(field.default), accepted(field), field.description or "")
        for name, field in Settings.model_fields.items()
    ]


def settings_table() -> str:
    rows = settings()
    if missing := [name for name, _, _, description in rows if not description]:
        raise ValueError(f"settings without a description: {', '.join(missing)}")
    return _table(
        ("variable", "default", "takes", "meaning"),
        [(f"`{name}`", default, takes, text) for name, default, takes, text in rows],
    )


# --- metrics ----------------------------------------------------------------------------------------


def metrics() -> list[tuple[str, str, tuple[str, ...], str]]:
    """Every metric ``/metrics`` can show: exposed name, type, labels, help (from ``service.metrics``)."""
    import prometheus_client as prom

    from service.metrics import ModelStateCollector, ServerProcessCollector, get_metrics

    families: list[tuple[Any, tuple[str, ...]]] = []
    for declared in vars(get_metrics()).values():
        if isinstance(declared, prom.metrics.MetricWrapperBase):
            families.append((next(iter(declared.describe())), tuple(declared._labelnames)))
    for collector in (ServerProcessCollector(os.getpid()), ModelStateCollector(list)):
        families += [(family, tuple(family._labelnames)) for family in collector.collect()]
    return [
        (family.name + ("_total" if family.type == "counter" else ""), family.type, labels, family.documentation)
        for family, labels in families
    ]


def metrics_table() -> str:
    rows = metrics()
    if missing := [name for name, _, _, documentation in rows if not documentation]:
        raise ValueError(f"metrics without a description: {', '.join(missing)}")
    return _table(
        ("metric", "type", "labels", "meaning"),
        [(f"`{name}`", kind, ", ".join(labels), text) for name, kind, labels, text in rows],
    )


# --- HTTP API ---------------------------------------------------------------------------------------


def _schema_type(schema: dict[str, Any]) -> str:
    if "anyOf" in schema:
        return " or ".join(_schema_type(part) for part in schema["anyOf"] if part.get("type") != "null")
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    kind = schema.get("type", "any")
    if "enum" in schema:
        kind += " (" + ", ".join(f"`{value}`" for value in schema["enum"]) + ")"
    bounds = [f"≥ {schema['minimum']}" if "minimum" in schema else "", f"≤ {schema['maximum']}" if "maximum" in schema
              else "", f"> {schema['exclusiveMinimum']}" if "exclusiveMinimum" in schema else ""]  # fmt: skip
    return " ".join([kind, *(bound for bound in bounds if bound)])


def openapi() -> dict[str, Any]:
    """The OpenAPI document the service serves on ``/openapi.json``."""
    from service.frontends.app import create_app

    return create_app().openapi()


def _operation(path: str, method: str, operation: dict[str, Any]) -> Iterator[str]:
    yield f"### `{method.upper()} {path}`\n"
    yield operation.get("summary", "") + "\n"
    if operation.get("description"):
        yield operation["description"] + "\n"
    parameters = operation.get("parameters", [])
    if parameters:
        rows = []
        for parameter in parameters:
            schema = parameter.get("schema", {})
            default = (
                _default(schema["default"]) if "default" in schema else "required" if parameter.get("required") else ""
            )
            rows.append((f"`{parameter['name']}`", parameter["in"], _schema_type(schema), default,
                         parameter.get("description", schema.get("description", ""))))  # fmt: skip
        yield _table(("parameter", "in", "type", "default", "meaning"), rows) + "\n"
    body = operation.get("requestBody", {}).get("content", {})
    if body:
        yield "Body: " + ", ".join(f"`{media}`" for media in body) + "\n"
    responses = [(f"`{code}`", answer.get("description", "")) for code, answer in operation["responses"].items()]
    yield _table(("status", "when"), responses) + "\n"


def http_api() -> str:
    spec = openapi()
    parts: list[str] = []
    # the service's own routes first, then the Open Inference Protocol's (/v2)
    for path, operations in sorted(spec["paths"].items(), key=lambda item: item[0].startswith("/v2")):
        for method, operation in operations.items():
            parts += _operation(path, method, operation)
    return "\n".join(parts)


# --- gRPC, command lines, alerts, models --------------------------------------------------------------

PROTO = ROOT / "service/frontends/v2/protocol/grpc_predict_v2.proto"


def grpc_api() -> str:
    """The gRPC services' calls (from the compiled ``.proto``), then the ``.proto`` itself."""
    from service.frontends.v2.protocol import grpc_predict_v2_pb2 as protocol

    rows = [
        (f"`{service.full_name}/{method.name}`", f"`{method.input_type.name}`", f"`{method.output_type.name}`")
        for service in protocol.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    ]
    source = PROTO.read_text(encoding="utf-8")
    quoted = "\n".join("    " + line if line else "" for line in source.splitlines())
    return (
        _table(("call", "request", "response"), rows)
        + f'\n\n??? note "The whole `{PROTO.relative_to(ROOT)}`"\n\n    ```protobuf\n{quoted}\n    ```\n'
    )


def command_help(module: str) -> str:
    """``python -m MODULE --help`` as it prints, at 100 columns, in a clean environment."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("CNN_SERVING")} | {"COLUMNS": "100"}
    found = subprocess.run(
        [sys.executable, "-m", module, "--help"], cwd=ROOT, env=environment, capture_output=True, text=True, check=True
    )
    return f"```text\n{found.stdout.rstrip()}\n```"


def alerts() -> list[dict[str, Any]]:
    import yaml

    document = yaml.safe_load((ROOT / "monitoring/alerts.yml").read_text(encoding="utf-8"))
    return [rule for group in document["groups"] for rule in group["rules"] if "alert" in rule]


def alerts_table() -> str:
    rows = [
        (f"`{rule['alert']}`", rule.get("labels", {}).get("severity", ""), rule.get("for", "at once"),
         f"`{rule['expr']}`", rule["annotations"]["description"])
        for rule in alerts()
    ]  # fmt: skip
    return _table(("alert", "severity", "for", "fires when", "what it means, what to do"), rows)


def model_table() -> str:
    from export.cli import model_table as registry_table

    return registry_table(markdown=True)


GENERATORS: dict[str, Callable[[], str]] = {
    "settings": settings_table,
    "metrics": metrics_table,
    "http-api": http_api,
    "grpc-api": grpc_api,
    "export-help": lambda: command_help("export"),
    "client-help": lambda: command_help("client"),
    "alerts": alerts_table,
    "models": model_table,
}


def expand(markdown: str, where: str = "") -> str:
    """Every marker of a page replaced by what it names."""

    def generated(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in GENERATORS:
            raise ValueError(f"{where}: unknown generated section {name!r}; known: {', '.join(sorted(GENERATORS))}")
        return GENERATORS[name]()

    return MARKER.sub(generated, markdown)


# --- MkDocs' hook events ----------------------------------------------------------------------------------


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    from mkdocs.exceptions import PluginError

    try:
        return expand(markdown, page.file.src_uri)
    except (ValueError, subprocess.CalledProcessError) as exc:
        raise PluginError(str(exc)) from exc


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    for pattern in PUBLISHED:
        for path in sorted(ROOT.glob(pattern)):
            files.append(File.generated(config, path.relative_to(ROOT).as_posix(), abs_src_path=str(path)))
    return files
