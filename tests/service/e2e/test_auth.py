"""API_TOKEN: inference and model routes need the bearer token; probes and metrics stay open."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from service.frontends.auth import token_matches
from service.store.layout import ModelStore

from ...helpers import ServiceProcess, encode, http_codes, running, wait_until

pytestmark = pytest.mark.integration

TOKEN = "correct-horse-battery-staple"
DIGIT = encode(np.full((28, 28), 255, dtype=np.uint8))


@pytest.fixture(scope="module")
def locked(model_store: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    log = tmp_path_factory.mktemp("logs") / "locked.log"
    with running(Path(model_store.root), log, API_TOKEN=TOKEN, MODELS="lenet5", ENABLE_NOOP="true") as process:
        yield process


def call(service: ServiceProcess, method: str, path: str, authorization: str | None) -> httpx.Response:
    headers = {"Authorization": authorization} if authorization else {}
    if method == "POST" and path.startswith(("/classify", "/explain", "/noop")):
        headers["Content-Type"] = "image/png"
        return httpx.post(f"{service.url}{path}", content=DIGIT, headers=headers, timeout=30)
    if method == "POST":
        body = {"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 32, 32, 1], "data": [0] * 1024}]}
        return httpx.post(f"{service.url}{path}", json=body, headers=headers, timeout=30)
    return httpx.get(f"{service.url}{path}", headers=headers, timeout=30)


PROTECTED = [
    ("POST", "/classify?model=lenet5"),
    ("POST", "/explain?model=lenet5"),
    ("GET", "/models"),
    ("GET", "/v2"),
    ("GET", "/v2/models/lenet5"),
    ("GET", "/v2/models/lenet5/ready"),
    ("POST", "/v2/models/lenet5/infer"),
    ("POST", "/noop"),
]
OPEN = ["/livez", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"]


@pytest.mark.parametrize(("method", "path"), PROTECTED)
def test_protected_routes_need_the_token(locked: ServiceProcess, method: str, path: str) -> None:
    """Each refusal is a 401 that says what to send, counted under the route the granted request is counted
    under (refused before any routing, they were all counted as 'unmatched')."""
    before = http_codes(locked)
    for authorization in (None, "Bearer wrong", f"Basic {TOKEN}", TOKEN, f"Bearer {TOKEN}x"):
        response = call(locked, method, path, authorization)
        assert response.status_code == 401, (authorization, response.text)
        assert "Bearer" in response.json()["error"] and response.headers["www-authenticate"].startswith("Bearer")
    assert call(locked, method, path, f"Bearer {TOKEN}").status_code == 200

    def counted() -> tuple[list[str], dict[tuple[str, str], float]]:
        after = http_codes(locked)
        granted = [
            r for (r, code), n in after.items() if code == "200" and r != "/metrics" and n > before.get((r, code), 0)
        ]
        return granted, after

    # a request is counted once its answer is written: a scrape can come first, on either worker
    wait_until(lambda: len(counted()[0]) == 1, 30, "the granted request counted")
    (route,), after = counted()
    assert after[(route, "401")] - before.get((route, "401"), 0) == 5, route
    assert after.get(("unmatched", "401"), 0) == before.get(("unmatched", "401"), 0)


@pytest.mark.parametrize("path", OPEN)
def test_probes_and_metrics_stay_open(locked: ServiceProcess, path: str) -> None:
    assert httpx.get(f"{locked.url}{path}", timeout=10).status_code == 200


def test_grpc_needs_the_token_except_for_health(locked: ServiceProcess) -> None:
    client = triton_grpc.InferenceServerClient(locked.grpc_target)
    assert client.is_server_live() and client.is_server_ready()
    with grpc.insecure_channel(locked.grpc_target) as channel:  # grpc.health.v1, as a Kubernetes probe asks it
        ready = health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService")
        assert (
            health_pb2_grpc.HealthStub(channel).Check(ready, timeout=10).status
            == health_pb2.HealthCheckResponse.SERVING
        )
    files = triton_grpc.InferInput("image_bytes", [1], "BYTES")
    files.set_data_from_numpy(np.array([DIGIT], dtype=object))
    for headers in (None, {"authorization": "Bearer wrong"}):
        with pytest.raises(InferenceServerException) as info:
            client.infer("lenet5", [files], headers=headers)
        assert str(info.value.status()) == "StatusCode.UNAUTHENTICATED"
        with pytest.raises(InferenceServerException):
            client.get_model_metadata("lenet5", headers=headers)
    good = {"authorization": f"Bearer {TOKEN}"}
    assert client.infer("lenet5", [files], headers=good).as_numpy("probabilities").shape == (1, 10)


def test_token_comparison() -> None:
    assert token_matches(f"Bearer {TOKEN}", TOKEN) and token_matches(f"bearer {TOKEN}", TOKEN)
    assert not token_matches(None, TOKEN) and not token_matches("", TOKEN)
    assert not token_matches(f"Token {TOKEN}", TOKEN) and not token_matches(f"Bearer {TOKEN[:-1]}", TOKEN)


def test_unset_by_default(service: ServiceProcess) -> None:
    assert httpx.get(f"{service.url}/models", timeout=10).status_code == 200
