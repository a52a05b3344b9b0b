"""POST /classify and GET /models on the real service (``bentoml serve`` in a subprocess)."""

from __future__ import annotations

import asyncio
import gzip

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from skimage import data

from service.store.layout import ModelStore
from service.store.metadata import ModelMetadata
from service.store.preprocess import preprocess

from ...helpers import ServiceProcess, classify, encode, http_codes, metric_samples

pytestmark = pytest.mark.integration

CAT = encode(data.chelsea(), "JPEG", quality=92)
COFFEE = encode(data.coffee(), "PNG")


def test_raw_body_upload_classifies(service: ServiceProcess) -> None:
    response = classify(service, CAT, model="resnet18")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "resnet18" and body["version"] == "1"
    (result,) = body["results"]
    predictions = result["predictions"]
    assert len(predictions) == 5  # the default top_k
    scores = [p["score"] for p in predictions]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    assert all(isinstance(p["label"], str) and 0 <= p["index"] < 1000 for p in predictions)


def test_multipart_upload_answers_each_file_in_order(service: ServiceProcess) -> None:
    files = [("image", ("cat.jpg", CAT, "image/jpeg")), ("image", ("coffee.png", COFFEE, "image/png"))]
    response = httpx.post(f"{service.url}/classify", params={"model": "resnet18"}, files=files, timeout=30)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    singles = [
        classify(service, CAT, model="resnet18").json()["results"][0],
        classify(service, COFFEE, "image/png", model="resnet18").json()["results"][0],
    ]
    assert len(results) == 2
    for got, single in zip(results, singles, strict=True):
        assert [p["index"] for p in got["predictions"]] == [p["index"] for p in single["predictions"]]
        np.testing.assert_allclose(
            [p["score"] for p in got["predictions"]], [p["score"] for p in single["predictions"]], atol=1e-5
        )


def test_model_parameter_switches_the_network(service: ServiceProcess) -> None:
    default = classify(service, CAT).json()
    lenet = classify(service, CAT, model="lenet5").json()
    assert default["model"] == "resnet18"  # DEFAULT_MODEL
    assert lenet["model"] == "lenet5"
    assert {p["label"] for p in lenet["results"][0]["predictions"]} <= set("0123456789")
    assert lenet["results"][0]["predictions"][0]["score"] != default["results"][0]["predictions"][0]["score"]


def test_top_k_selects_and_clamps(service: ServiceProcess) -> None:
    three = classify(service, CAT, model="resnet18", top_k=3).json()["results"][0]["predictions"]
    five = classify(service, CAT, model="resnet18", top_k=5).json()["results"][0]["predictions"]
    assert len(three) == 3 and three == five[:3]
    clamped = classify(service, CAT, model="lenet5", top_k=50).json()["results"][0]["predictions"]
    assert sorted(p["index"] for p in clamped) == list(range(10))
    assert sum(p["score"] for p in clamped) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("name", ["resnet18", "lenet5"])
def test_served_probabilities_equal_the_graph_run_directly(
    service: ServiceProcess, model_store: ModelStore, name: str
) -> None:
    latest = model_store.latest(name)
    assert latest is not None
    metadata = ModelMetadata.model_validate(latest.read_metadata())
    pixels = preprocess(CAT, metadata.input, max_pixels=10**8)
    session = ort.InferenceSession(str(latest.graph), providers=["CPUExecutionProvider"])
    (expected,) = session.run(["probabilities"], {"images": pixels[None]})
    served = classify(service, CAT, model=name, top_k=1000).json()["results"][0]["predictions"]
    got = np.zeros_like(expected[0])
    for p in served:
        got[p["index"]] = p["score"]
    np.testing.assert_allclose(got, expected[0], rtol=0, atol=1e-6)


def _batch_histogram(service: ServiceProcess, model: str) -> tuple[float, float]:
    text = httpx.get(f"{service.url}/metrics", timeout=10).text
    samples = metric_samples(text, "cnn_batch_size_count") + metric_samples(text, "cnn_batch_size_sum")
    count = sum(v for labels, v in metric_samples(text, "cnn_batch_size_count") if labels["model"] == model)
    total = sum(v for labels, v in metric_samples(text, "cnn_batch_size_sum") if labels["model"] == model)
    assert samples, "the batch-size metric is missing"
    return count, total


def test_64_concurrent_requests_all_succeed_in_batches(service: ServiceProcess) -> None:
    calls_before, images_before = _batch_histogram(service, "resnet18")

    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=service.url, limits=limits, timeout=120) as client:
            return await asyncio.gather(
                *(
                    client.post("/classify?model=resnet18", content=CAT, headers={"Content-Type": "image/jpeg"})
                    for _ in range(64)
                )
            )

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 64
    first = responses[0].json()["results"][0]["predictions"][0]
    assert all(r.json()["results"][0]["predictions"][0]["index"] == first["index"] for r in responses)
    calls_after, images_after = _batch_histogram(service, "resnet18")
    calls, images = calls_after - calls_before, images_after - images_before
    assert images == 64
    assert calls < 64 and images / calls > 1  # several requests shared session calls


MULTIPART = "multipart/form-data"
ERROR_CASES = [
    ("undecodable image", dict(body=b"\x89PNG\r\n\x1a\n garbage"), 400, "decode"),
    ("empty body", dict(body=b""), 400, "Empty"),
    ("top_k not a number", dict(params={"top_k": "abc"}), 400, "top_k"),
    ("top_k zero", dict(params={"top_k": 0}), 400, "top_k"),
    ("top_k huge", dict(params={"top_k": 10**9}), 400, "top_k"),
    ("version not a number", dict(params={"version": "x"}), 400, "version"),
    ("unknown model", dict(params={"model": "resnet5"}), 404, "available: ghost, lenet5, resnet18"),
    ("unknown version", dict(params={"model": "resnet18", "version": 7}), 404, "version 7"),
    ("model with a slash", dict(params={"model": "../resnet18"}), 400, "Invalid model name"),
    ("wrong content type", dict(content_type="text/plain"), 415, "image/jpeg"),
    (
        "multipart without a file",
        dict(content_type="multipart/form-data; boundary=x", body=b"--x--\r\n"),
        400,
        "no file",
    ),
    ("body over the limit", dict(body=b"\xff" * (20 * 1024 * 1024 + 1)), 413, "MAX_BODY_BYTES"),
    ("model that failed to load", dict(params={"model": "ghost"}), 503, "not in the model store"),
]


@pytest.mark.parametrize(("case", "request_args", "status", "phrase"), ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_client_errors_are_json_with_the_right_status(
    service: ServiceProcess, case: str, request_args: dict, status: int, phrase: str
) -> None:
    params = {"model": "resnet18", **request_args.get("params", {})}
    response = classify(service, request_args.get("body", CAT), request_args.get("content_type", "image/jpeg"),
                        **params)  # fmt: skip
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert phrase in response.json()["error"]
    # and the service goes on serving
    assert classify(service, CAT, model="resnet18").status_code == 200


def test_a_content_coded_body_is_refused_with_what_to_send_instead(service: ServiceProcess) -> None:
    """A gzipped body was read as it came: "Cannot decode the image" on /classify, "not valid JSON" on /v2."""
    headers = {"Content-Type": "image/jpeg", "Content-Encoding": "gzip"}
    coded = httpx.post(
        f"{service.url}/classify?model=resnet18", content=gzip.compress(CAT), headers=headers, timeout=60
    )
    assert coded.status_code == 415 and "Content-Encoding 'gzip' is not supported" in coded.json()["error"]
    body = gzip.compress(b'{"inputs": []}')
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    v2 = httpx.post(f"{service.url}/v2/models/resnet18/infer", content=body, headers=headers, timeout=60)
    assert v2.status_code == 415 and "send the body as it is" in v2.json()["error"]
    headers = {"Content-Type": "image/jpeg", "Content-Encoding": "identity"}
    assert httpx.post(f"{service.url}/classify?model=resnet18", content=CAT, headers=headers, timeout=60).is_success


def test_too_many_files_is_413(service: ServiceProcess) -> None:
    small = encode(np.zeros((8, 8), dtype=np.uint8))
    files = [("image", (f"{i}.png", small, "image/png")) for i in range(65)]
    response = httpx.post(f"{service.url}/classify", params={"model": "lenet5"}, files=files, timeout=30)
    assert response.status_code == 413 and "MAX_IMAGES_PER_REQUEST" in response.json()["error"]


def test_models_lists_state_provider_and_metadata(service: ServiceProcess) -> None:
    body = httpx.get(f"{service.url}/models", timeout=10).json()
    models = {m["name"]: m for m in body["models"]}
    assert body["default_model"] == "resnet18"
    assert set(models) == {"lenet5", "resnet18", "ghost"}
    resnet = models["resnet18"]
    assert resnet["status"] == "ready" and resnet["provider"] == "CPUExecutionProvider"
    assert resnet["num_params"] == 11_689_512 and resnet["flops_per_image"] > 1e9
    assert resnet["input"]["resize"] == 256 and resnet["input"]["crop"] == 224
    assert resnet["weights"]["kind"] == "random" and resnet["versions"] == [1]
    assert models["lenet5"]["weights"]["details"]["test_accuracy"] >= 0.97
    assert models["ghost"]["status"] == "failed" and "not in the model store" in models["ghost"]["reason"]


def test_health_endpoints(service: ServiceProcess) -> None:
    assert httpx.get(f"{service.url}/livez", timeout=5).status_code == 200
    assert httpx.get(f"{service.url}/readyz", timeout=5).status_code == 200


def test_openapi_describes_classify_truthfully(service: ServiceProcess) -> None:
    spec = httpx.get(f"{service.url}/docs.json", timeout=10).json()
    operation = spec["paths"]["/classify"]["post"]
    assert {p["name"] for p in operation["parameters"] if p["in"] == "query"} == {
        "model",
        "top_k",
        "version",
        "min_confidence",
    }
    assert {"image/*", "application/octet-stream", "multipart/form-data"} <= set(operation["requestBody"]["content"])
    assert {"200", "400", "404", "413", "415", "503"} <= set(operation["responses"])
    assert "/models" in spec["paths"]
    assert not [path for path, operations in spec["paths"].items() if "head" in operations]  # HEAD: not listed


def test_every_get_route_answers_head(service: ServiceProcess) -> None:
    """HEAD /models, /metrics, /v2/health/ready were 405 with Allow: GET (a monitor's probe often sends HEAD)."""
    for path in ("/models", "/metrics", "/v2/health/ready", "/v2/models/lenet5", "/v2/models/lenet5/ready"):
        got, head = httpx.get(f"{service.url}{path}", timeout=10), httpx.head(f"{service.url}{path}", timeout=10)
        assert (head.status_code, head.content) == (got.status_code, b""), path
        assert head.headers["content-type"] == got.headers["content-type"], path
    refused = httpx.head(f"{service.url}/classify", timeout=10)
    assert refused.status_code == 405 and refused.headers["allow"] == "POST"
    before = http_codes(service)
    assert httpx.head(f"{service.url}/v2/models/lenet5/ready", timeout=10).status_code == 200
    after = http_codes(service)  # counted under its route, not as unmatched
    key = ("/v2/models/{name}/ready", "200")
    assert after.get(key, 0) == before.get(key, 0) + 1 and after.get(("unmatched", "200"), 0) == 0
