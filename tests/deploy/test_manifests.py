"""deploy/kubernetes, validated offline: every overlay renders with Kustomize, every object
validates against its schema, the alerts pass their promtool tests, and the manifests agree
with the service's own settings."""

from __future__ import annotations

import subprocess
import sys
from functools import cache
from typing import Any

import kubernetes_validate
import pytest
import yaml

from service.settings import Settings

from ..helpers import ROOT, tool
from .schemas import CUSTOM_KINDS, validate_core, validate_custom, validate_inference_service

KUBERNETES = ROOT / "deploy" / "kubernetes"
OVERLAYS = ["cpu", "gpu", "kserve", "triton", "whole-store"]


@cache
def render(directory: str) -> tuple[dict[str, Any], ...]:
    result = subprocess.run([tool("kubectl"), "kustomize", str(KUBERNETES / directory)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return tuple(yaml.safe_load_all(result.stdout))


def find(objects: tuple[dict[str, Any], ...], kind: str, name: str | None = None) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    return found


@pytest.mark.parametrize("overlay", ["base", *(f"overlays/{o}" for o in OVERLAYS)])
def test_every_object_validates_against_its_schema(overlay: str) -> None:
    objects = render(overlay)
    custom = [o for o in objects if o["kind"] in CUSTOM_KINDS]
    for obj in objects:
        if obj["kind"] == "InferenceService":
            assert validate_inference_service(obj) == [], obj["metadata"]["name"]
        elif obj["kind"] not in CUSTOM_KINDS:
            validate_core(obj)
    assert {k: e for k, e in validate_custom(custom).items() if e} == {}


def test_the_validators_reject_what_a_cluster_would() -> None:
    deployment = find(render("overlays/cpu"), "Deployment")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = broken["spec"]["template"]["spec"][
        "containers"
    ][0].pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_core(broken)

    scaled = yaml.safe_load(yaml.safe_dump(find(render("overlays/cpu"), "ScaledObject")))
    scaled["spec"]["minReplicaCount"] = "two"
    rule = yaml.safe_load(yaml.safe_dump(find(render("overlays/cpu"), "PrometheusRule")))
    rule["spec"]["groups"][0]["rules"][0]["for"] = 5
    errors = validate_custom([scaled, rule])
    assert "minReplicaCount must be integer" in str(errors[("ScaledObject", "cnn-serving")])
    assert "must be string" in str(errors[("PrometheusRule", "cnn-serving")])

    service = yaml.safe_load(yaml.safe_dump(find(render("overlays/kserve"), "InferenceService")))
    service["spec"]["predictor"]["minReplica"] = 2
    service["spec"]["predictor"]["containers"][0]["ports"][0]["containerPort"] = "3000"
    errors = validate_inference_service(service)
    assert any("minReplica: unknown field" in e for e in errors)
    assert any("'3000' is not of type 'integer'" in e for e in errors)


def test_the_settings_configmap_names_only_real_settings() -> None:
    settings = find(render("base"), "ConfigMap")["data"]
    known = {name.upper() for name in Settings.model_fields}
    assert set(settings) <= known, set(settings) - known
    Settings.model_validate({k.lower(): v for k, v in settings.items() if v != ""})  # and each value parses


def test_the_deployment_keeps_its_promises() -> None:
    objects = render("overlays/cpu")
    settings = find(objects, "ConfigMap")["data"]
    pod = find(objects, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    defaults = Settings()

    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": defaults.http_port, "grpc": defaults.grpc_port}
    service_ports = {p["name"]: p for p in find(objects, "Service")["spec"]["ports"]}
    assert service_ports["grpc"]["appProtocol"] == "kubernetes.io/h2c"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 180  # VGG-16's load and warm-up

    # SIGKILL only after the preStop pause and the longest request
    pause = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > pause + float(settings["REQUEST_TIMEOUT_S"])

    assert container["resources"]["requests"] == container["resources"]["limits"]
    assert pod["securityContext"]["runAsNonRoot"] and container["securityContext"]["readOnlyRootFilesystem"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert mounts[settings["MODEL_STORE"]]["readOnly"] is True
    assert env["BENTOML_HOME"] in mounts and env["TMPDIR"] in mounts  # writable on a read-only root
    volumes = {v["name"]: v for v in pod["volumes"]}
    store = volumes[mounts[settings["MODEL_STORE"]]["name"]]["persistentVolumeClaim"]
    assert find(objects, "PersistentVolumeClaim", store["claimName"])["spec"]["accessModes"] == ["ReadOnlyMany"]

    scaled = find(objects, "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == find(objects, "Deployment")["metadata"]["name"]
    monitor = find(objects, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "http"
    service_labels = find(objects, "Service")["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service_labels.items()
    assert service_labels[monitor["spec"]["jobLabel"]] == "cnn-serving"  # the job the alerts name


def test_the_gpu_overlay_asks_for_one_gpu_and_cuda() -> None:
    objects = render("overlays/gpu")
    (container,) = find(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    # a rollout needs no GPU beyond the replicas': one old pod goes before its successor is scheduled
    rolling = find(objects, "Deployment")["spec"]["strategy"]["rollingUpdate"]
    assert rolling == {"maxSurge": 0, "maxUnavailable": 1}
    settings = find(objects, "ConfigMap")["data"]
    assert settings["PROVIDERS"] == "cuda" and settings["WORKERS"] == "0"  # the CPUs feed one session host
    limits, requests = container["resources"]["limits"], container["resources"]["requests"]
    assert limits["cpu"] == requests["cpu"] == "8" and limits["memory"] == requests["memory"] == "8Gi"


def test_the_whole_store_overlay_serves_on_demand_within_the_containers_limit() -> None:
    objects = render("overlays/whole-store")
    settings = find(objects, "ConfigMap")["data"]
    assert settings["MODEL_CONTROL"] == "on-demand" and "MEMORY_BUDGET" not in settings  # from the cgroup limit
    (container,) = find(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["memory"] == container["resources"]["requests"]["memory"]


def test_the_kserve_overlays_serve_the_store_over_v2() -> None:
    ours = find(render("overlays/kserve"), "InferenceService")["spec"]["predictor"]
    (container,) = ours["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["STORAGE_URI"] == "pvc://cnn-model-store" and env["MODEL_STORE"] == "/mnt/models"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert {p["containerPort"] for p in container["ports"]} == {3000, 8001}
    grpc = find(render("overlays/kserve"), "Service", "cnn-serving-grpc")
    assert grpc["spec"]["ports"][0]["targetPort"] == 8001

    triton = find(render("overlays/triton"), "InferenceService")["spec"]["predictor"]["model"]
    assert triton["protocolVersion"] == "v2" and triton["storageUri"] == "pvc://cnn-model-store"
    assert triton["modelFormat"]["name"] == "triton"


def test_our_pods_are_hardened_alike_under_a_deployment_and_under_kserve() -> None:
    deployment = find(render("overlays/cpu"), "Deployment")["spec"]["template"]["spec"]
    predictor = find(render("overlays/kserve"), "InferenceService")["spec"]["predictor"]
    for pod in (deployment, predictor):
        assert pod["automountServiceAccountToken"] is False  # the service calls no Kubernetes API
        context = pod["securityContext"]
        assert context["runAsNonRoot"] and context["seccompProfile"] == {"type": "RuntimeDefault"}
        (container,) = pod["containers"]
        guard = container["securityContext"]
        assert guard["readOnlyRootFilesystem"] and guard["allowPrivilegeEscalation"] is False
        assert guard["capabilities"] == {"drop": ["ALL"]}


def test_the_prometheusrule_is_generated_from_the_alerts_file() -> None:
    sys.path.insert(0, str(KUBERNETES))
    try:
        import prometheusrule
    finally:
        sys.path.remove(str(KUBERNETES))
    assert (KUBERNETES / "components" / "monitoring" / "prometheusrule.yaml").read_text() == prometheusrule.render(), (
        "stale: run `make manifests`"
    )
    alerts = yaml.safe_load((ROOT / "monitoring" / "alerts.yml").read_text())
    assert find(render("overlays/cpu"), "PrometheusRule")["spec"]["groups"] == alerts["groups"]


def test_the_alerts_pass_their_promtool_unit_tests() -> None:
    promtool = tool("promtool")
    # the rules' syntax: `promtool check config` in tests/monitoring (prometheus.yml loads alerts.yml)
    tests = subprocess.run(
        [promtool, "test", "rules", "monitoring/alerts_test.yml"], cwd=ROOT, capture_output=True, text=True
    )
    assert tests.returncode == 0, tests.stdout + tests.stderr
    alerts = {
        r["alert"]
        for g in yaml.safe_load((ROOT / "monitoring" / "alerts.yml").read_text())["groups"]
        for r in g["rules"]
    }
    tested = {t["alertname"] for case in yaml.safe_load((ROOT / "monitoring" / "alerts_test.yml").read_text())["tests"]
              for t in case["alert_rule_test"]}  # fmt: skip
    assert alerts == tested
