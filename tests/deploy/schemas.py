"""Schema checks for the rendered manifests, with no cluster: core objects, CRDs, KServe.

- Core objects: the Kubernetes JSON schemas packaged by ``kubernetes-validate`` (strict: an
  unknown field is an error, as with ``kubectl apply --validate=strict``).
- ScaledObject, ServiceMonitor, PrometheusRule: their CRDs' openAPIV3Schema as packaged by
  kubernetes-models (npm, pinned in deploy/kubernetes/validate/package.json), through
  ``validate.mjs``.
- InferenceService: KServe publishes its CRD in no package registry, so it is checked against
  the OpenAPI types of KServe's own Python SDK (the wheel ``make test-tools`` downloads):
  every field must exist there with its type, and nested Kubernetes types (containers,
  probes, volumes) go to the strict core schemas.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import zipfile
from functools import cache
from importlib.resources import files
from typing import Any

import jsonschema
import kubernetes_validate
from referencing import Registry, Resource

from ..helpers import ROOT

KUBERNETES_VERSION = "1.34.0"
CRD_VALIDATOR = ROOT / "deploy" / "kubernetes" / "validate"
KSERVE_WHEEL = ROOT / ".tools" / "kserve-0.21.0-py3-none-any.whl"
CUSTOM_KINDS = {"ScaledObject", "ServiceMonitor", "PrometheusRule"}


def validate_core(obj: dict[str, Any]) -> None:
    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def validate_custom(objects: list[dict[str, Any]]) -> dict[tuple[str, str], str | None]:
    """{(kind, name): error or None} for ScaledObject, ServiceMonitor and PrometheusRule objects."""
    assert (CRD_VALIDATOR / "node_modules").is_dir(), "`make test-tools` installs the CRD schemas (npm ci)"
    result = subprocess.run(
        ["node", "validate.mjs"], cwd=CRD_VALIDATOR, input=json.dumps(objects), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return {(r["kind"], r["name"]): r["error"] for r in json.loads(result.stdout)}


@cache
def _kserve_types() -> dict[str, dict[str, tuple[str, str]]]:
    """{class: {json name: (python attribute, openapi type)}} from the KServe SDK's generated models."""
    assert KSERVE_WHEEL.is_file(), "`make test-tools` downloads the KServe SDK wheel (pip download)"
    types: dict[str, dict[str, tuple[str, str]]] = {}
    with zipfile.ZipFile(KSERVE_WHEEL) as wheel:
        for name in wheel.namelist():
            if not re.fullmatch(r"kserve/models/v1beta1_\w+\.py", name):
                continue
            for node in ast.walk(ast.parse(wheel.read(name))):
                if isinstance(node, ast.ClassDef):
                    fields = {
                        t.id: ast.literal_eval(s.value)
                        for s in node.body
                        if isinstance(s, ast.Assign)
                        for t in s.targets
                        if isinstance(t, ast.Name) and t.id in ("openapi_types", "attribute_map")
                    }
                    if fields:
                        types[node.name] = {
                            json_name: (attr, fields["openapi_types"][attr])
                            for attr, json_name in fields["attribute_map"].items()
                        }
    return types


@cache
def _core_schema_validator(type_name: str) -> jsonschema.Draft202012Validator:
    """A strict validator for a Kubernetes type as the SDK names it (V1Container -> container-v1.json)."""
    directory = files("kubernetes_validate") / "kubernetes-json-schema" / f"v{KUBERNETES_VERSION}-local-strict"
    match = re.fullmatch(r"V1(\w+)|K8sIoApi(\w+?)V1(\w+)", type_name)
    assert match, f"no Kubernetes schema for {type_name}"
    kind, group = (match[1], None) if match[1] else (match[3], match[2])
    filename = f"{kind.lower()}-{group.lower()}-v1.json" if group else f"{kind.lower()}-v1.json"
    schema = json.loads((directory / filename).read_text())
    definitions = json.loads((directory / "_definitions.json").read_text())
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
    return jsonschema.Draft202012Validator(schema, registry=registry)


def kserve_errors(value: Any, type_name: str, path: str = "spec") -> list[str]:
    """Every way ``value`` departs from KServe's type ``type_name`` (empty when it conforms)."""
    if type_name in ("str", "int", "bool", "float"):
        python = {"str": str, "int": int, "bool": bool, "float": (int, float)}[type_name]
        ok = isinstance(value, python) and not (type_name == "int" and isinstance(value, bool))
        return [] if ok else [f"{path}: {value!r} is not {type_name}"]
    if type_name == "ResourceQuantity":
        return [] if isinstance(value, (str, int)) else [f"{path}: {value!r} is not a quantity"]
    if inner := re.fullmatch(r"list\[(.+)\]", type_name):
        if not isinstance(value, list):
            return [f"{path}: not a list"]
        return [e for i, item in enumerate(value) for e in kserve_errors(item, inner[1], f"{path}[{i}]")]
    if inner := re.fullmatch(r"dict\(str, (.+)\)", type_name):
        if not isinstance(value, dict):
            return [f"{path}: not a map"]
        return [e for k, item in value.items() for e in kserve_errors(item, inner[1], f"{path}.{k}")]
    types = _kserve_types()
    if type_name in types:
        if not isinstance(value, dict):
            return [f"{path}: not an object"]
        fields = types[type_name]
        errors = [f"{path}.{key}: unknown field of {type_name}" for key in value if key not in fields]
        return errors + [
            e
            for key, item in value.items()
            if key in fields
            for e in kserve_errors(item, fields[key][1], f"{path}.{key}")
        ]
    return [f"{path}: {e.message}" for e in _core_schema_validator(type_name).iter_errors(value)]


def validate_inference_service(obj: dict[str, Any]) -> list[str]:
    errors = (
        [] if obj.get("apiVersion") == "serving.kserve.io/v1beta1" else ["apiVersion is not serving.kserve.io/v1beta1"]
    )
    validate_core({"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]})  # metadata alone
    unknown = set(obj) - {"apiVersion", "kind", "metadata", "spec"}
    return (
        errors
        + [f"{key}: unknown field" for key in unknown]
        + kserve_errors(obj["spec"], "V1beta1InferenceServiceSpec")
    )
