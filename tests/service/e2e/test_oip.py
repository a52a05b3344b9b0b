"""The Open Inference Protocol over gRPC and HTTP, driven by the real tritonclient package."""

from __future__ import annotations

import asyncio
import json
from types import ModuleType

import grpc
import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http

# tritonclient's own generated messages and stub: a foreign client's code against our server.
# (Ours cannot be imported beside them: both register inference.* in protobuf's global pool.)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from skimage import data
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from service.store.layout import ModelStore

from ...helpers import ServiceProcess, encode, metric_samples

pytestmark = pytest.mark.integration

CAT = encode(data.chelsea(), "JPEG", quality=92)
PROTOCOLS = [pytest.param(triton_grpc, id="grpc"), pytest.param(triton_http, id="http")]


def client(module: ModuleType, service: ServiceProcess):  # type: ignore[no-untyped-def]
    return module.InferenceServerClient(service.grpc_target if module is triton_grpc else f"127.0.0.1:{service.port}")


def bytes_input(module: ModuleType, files: list[bytes]):  # type: ignore[no-untyped-def]
    tensor = module.InferInput("image_bytes", [len(files)], "BYTES")
    tensor.set_data_from_numpy(np.array(files, dtype=object))
    return tensor


def pixels_input(module: ModuleType, pixels: np.ndarray, datatype: str = "UINT8"):  # type: ignore[no-untyped-def]
    tensor = module.InferInput("images", list(pixels.shape), datatype)
    tensor.set_data_from_numpy(pixels)
    return tensor


def classify_probabilities(service: ServiceProcess, body: bytes, model: str) -> np.ndarray:
    response = httpx.post(
        f"{service.url}/classify", params={"model": model, "top_k": 1000}, content=body,
        headers={"Content-Type": "image/jpeg"}, timeout=30,
    )  # fmt: skip
    predictions = response.json()["results"][0]["predictions"]
    out = np.zeros(len(predictions), dtype=np.float32)
    for p in predictions:
        out[p["index"]] = p["score"]
    return out


@pytest.mark.parametrize("module", PROTOCOLS)
def test_health_and_server_metadata(service: ServiceProcess, module: ModuleType) -> None:
    c = client(module, service)
    assert c.is_server_live() and c.is_server_ready()
    assert c.is_model_ready("resnet18") and c.is_model_ready("lenet5")
    assert not c.is_model_ready("ghost")  # requested, failed to load
    metadata = c.get_server_metadata()
    extensions = metadata["extensions"] if module is triton_http else list(metadata.extensions)
    assert "classification" in extensions and "binary_tensor_data" in extensions


def test_grpc_standard_health_answers_as_livez_and_readyz(service: ServiceProcess) -> None:
    """grpc.health.v1, what Kubernetes' grpc probes ask: "" (a probe's default) and the inference service's name are
    readiness, "liveness" the worker answering; another name is NOT_FOUND naming them; Watch is UNIMPLEMENTED; bytes
    that are no request are INVALID_ARGUMENT."""
    serving = health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(service.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "inference.GRPCInferenceService", "liveness"):
            assert health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status == serving, name
        with pytest.raises(grpc.RpcError) as unknown:
            health.Check(health_pb2.HealthCheckRequest(service="inference.Other"), timeout=10)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        details = unknown.value.details()
        assert "'inference.Other'" in details and "'inference.GRPCInferenceService'" in details
        assert "'liveness'" in details
        ready = health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService")
        with pytest.raises(grpc.RpcError) as watch:
            next(health.Watch(ready, timeout=10))
        assert watch.value.code() == grpc.StatusCode.UNIMPLEMENTED and "Check" in watch.value.details()
        with pytest.raises(grpc.RpcError) as malformed:
            channel.unary_unary("/grpc.health.v1.Health/Check")(b"\xff\xff\xff", timeout=10)
        assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "no valid HealthCheckRequest message" in malformed.value.details()


@pytest.mark.parametrize("module", PROTOCOLS)
@pytest.mark.parametrize("name", ["resnet18", "lenet5"])  # LeNet-5's graph has a typicality distance
def test_model_metadata_matches_the_graph(
    service: ServiceProcess, model_store: ModelStore, module: ModuleType, name: str
) -> None:
    raw = client(module, service).get_model_metadata(name)
    if module is triton_grpc:
        raw = {
            "versions": list(raw.versions),
            "inputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in raw.inputs],
            "outputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in raw.outputs],
        }
    session = ort.InferenceSession(str(model_store.latest(name).graph), providers=["CPUExecutionProvider"])  # type: ignore[union-attr]
    graph_input = session.get_inputs()[0]
    inputs = {t["name"]: t for t in raw["inputs"]}
    assert inputs["images"] == {"name": "images", "datatype": "UINT8", "shape": [-1, *graph_input.shape[1:]]}
    assert inputs["image_bytes"]["datatype"] == "BYTES"
    outputs = {t["name"]: t for t in raw["outputs"]}
    # and the Grad-CAM map of the explanation graph beside it (its layer's size: LeNet-5 C3, ResNet layer4)
    assert set(outputs) == {o.name for o in session.get_outputs()} | {"gradcam"}
    map_size = [10, 10] if name == "lenet5" else [7, 7]
    assert outputs["gradcam"] == {"name": "gradcam", "datatype": "FP32", "shape": [-1, *map_size]}
    for graph_output in session.get_outputs():
        assert outputs[graph_output.name] == {
            "name": graph_output.name, "datatype": "FP32", "shape": [-1, *graph_output.shape[1:]]
        }  # fmt: skip
    assert raw["versions"] == ["1"]


@pytest.mark.parametrize("module", PROTOCOLS)
def test_image_bytes_give_what_classify_gives(service: ServiceProcess, module: ModuleType) -> None:
    result = client(module, service).infer("resnet18", [bytes_input(module, [CAT])])
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (1, 1000)
    np.testing.assert_allclose(probabilities[0], classify_probabilities(service, CAT, "resnet18"), atol=1e-5)
    assert result.as_numpy("logits").shape == (1, 1000)


@pytest.mark.parametrize("module", PROTOCOLS)
def test_uint8_images_equal_the_graph_run_directly(
    service: ServiceProcess, model_store: ModelStore, module: ModuleType
) -> None:
    pixels = np.random.default_rng(5).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    result = client(module, service).infer("resnet18", [pixels_input(module, pixels)])
    session = ort.InferenceSession(str(model_store.latest("resnet18").graph), providers=["CPUExecutionProvider"])  # type: ignore[union-attr]
    (expected,) = session.run(["probabilities"], {"images": pixels})
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=1e-6)


@pytest.mark.parametrize("module", PROTOCOLS)
def test_classification_extension(service: ServiceProcess, module: ModuleType) -> None:
    output = module.InferRequestedOutput("probabilities", class_count=5)
    result = client(module, service).infer("resnet18", [bytes_input(module, [CAT, CAT])], outputs=[output])
    classes = result.as_numpy("probabilities")
    assert classes.shape == (2, 5)
    expected = classify_probabilities(service, CAT, "resnet18")
    for entry in classes[0]:
        score, index, label = entry.decode().split(":", 2)
        assert float(score) == pytest.approx(float(expected[int(index)]), abs=1e-5) and label
    top5 = [int(e.decode().split(":")[1]) for e in classes[0]]
    assert top5 == list(np.argsort(-expected, kind="stable")[:5])


ERRORS = [
    ("unknown model", "nope", lambda m: [bytes_input(m, [CAT])], "NOT_FOUND", "404"),
    ("wrong datatype", "resnet18", lambda m: [pixels_input(m, np.zeros((1, 224, 224, 3), np.float32), "FP32")],
     "INVALID_ARGUMENT", "400"),
    ("wrong shape", "resnet18", lambda m: [pixels_input(m, np.zeros((1, 32, 32, 3), np.uint8))], "INVALID_ARGUMENT",
     "400"),
    ("wrong rank", "resnet18", lambda m: [pixels_input(m, np.zeros((224, 224, 3), np.uint8))], "INVALID_ARGUMENT",
     "400"),
    ("batch of zero", "resnet18", lambda m: [pixels_input(m, np.zeros((0, 224, 224, 3), np.uint8))],
     "INVALID_ARGUMENT", "400"),
    ("undecodable image", "resnet18", lambda m: [bytes_input(m, [b"not an image"])], "INVALID_ARGUMENT", "400"),
    ("failed model", "ghost", lambda m: [bytes_input(m, [CAT])], "UNAVAILABLE", "503"),
]  # fmt: skip


@pytest.mark.parametrize("module", PROTOCOLS)
@pytest.mark.parametrize(("case", "model", "inputs", "grpc_status", "http_status"), ERRORS, ids=[e[0] for e in ERRORS])
def test_errors_carry_the_protocol_status(
    service: ServiceProcess,
    module: ModuleType,
    case: str,
    model: str,
    inputs,
    grpc_status: str,
    http_status: str,  # type: ignore[no-untyped-def]
) -> None:
    c = client(module, service)
    with pytest.raises(InferenceServerException) as info:
        c.infer(model, inputs(module))
    expected = f"StatusCode.{grpc_status}" if module is triton_grpc else http_status
    assert str(info.value.status()) == expected, info.value.message()
    assert c.infer("resnet18", [bytes_input(module, [CAT])]).as_numpy("probabilities").shape == (1, 1000)


def _stub(service: ServiceProcess) -> pb_grpc.GRPCInferenceServiceStub:
    return pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(service.grpc_target))


JSON = {"Content-Type": "application/json"}
ZEROS = {"name": "images", "datatype": "UINT8", "shape": [1, 32, 32, 1], "data": [0] * 1024}
MALFORMED_JSON = [
    ("parameters a list", {"inputs": [ZEROS], "parameters": [1]}, "parameters must be a JSON object"),
    ("outputs a string", {"inputs": [ZEROS], "outputs": "probabilities"}, '"outputs" must be a list'),
    ("an output without a name", {"inputs": [ZEROS], "outputs": [{"a": 1}]}, 'an object with a "name"'),
    ("an input's parameters a list", {"inputs": [{**ZEROS, "parameters": [1]}]}, "its parameters must be"),
    ("binary_data_output a string", {"inputs": [ZEROS], "parameters": {"binary_data_output": "false"}},
     "binary_data_output must be true or false"),
    ("classification a string", {"inputs": [ZEROS], "outputs": [{"name": "probabilities",
     "parameters": {"classification": "3"}}]}, "classification must be a non-negative integer"),
    ("BYTES data a number", {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1],
     "data": [10**10]}]}, "BYTES data must be strings"),
    ("BYTES data null", {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1], "data": [None]}]},
     "BYTES data must be strings"),
    ("shape whose product wraps", {"inputs": [{**ZEROS, "shape": [2**32, 2**32], "data": []}]},
     "needs 18446744073709551616 values"),
    ("a dimension too large for numpy", {"inputs": [{**ZEROS, "shape": [10**30, 0], "data": []}]},
     "too large for any tensor"),
    ("shape of strings", {"inputs": [{**ZEROS, "shape": ["1", "32", "32", "1"]}]}, "must be a list of integers"),
    ("UINT64 past its range", {"inputs": [{"name": "x", "datatype": "UINT64", "shape": [1], "data": [2**64]}]},
     "values out of range for UINT64"),
    ("UINT64 past int64, in its range", {"inputs": [{"name": "images", "datatype": "UINT64", "shape": [1],
     "data": [2**64 - 1]}]}, "must be UINT8, got UINT64"),
    ("data a string", {"inputs": [{**ZEROS, "data": "0"}]}, '"data" must be a list'),
    ("UINT8 data strings of digits", {"inputs": [{**ZEROS, "data": ["0"] * 1024}]}, "not a list of UINT8 numbers"),
    ("UINT8 data true/false", {"inputs": [{**ZEROS, "data": [False] * 1024}]}, "not a list of UINT8 numbers"),
    ("UINT8 data fractions", {"inputs": [{**ZEROS, "data": [0.5] * 1024}]}, "UINT8 takes whole numbers"),
    ("BYTES data a lone surrogate", {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1],
     "data": ["\ud800"]}]}, "a BYTES string is not valid Unicode text"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "body", "says"), MALFORMED_JSON, ids=[c[0] for c in MALFORMED_JSON])
def test_a_malformed_json_request_is_a_400_that_names_the_field(
    service: ServiceProcess, case: str, body: dict, says: str
) -> None:
    sent = json.dumps(body)  # ASCII, escapes and all: httpx's json= cannot encode a lone surrogate
    response = httpx.post(f"{service.url}/v2/models/lenet5/infer", content=sent, headers=JSON, timeout=30)
    assert response.status_code == 400 and says in response.json()["error"], response.text
    assert httpx.post(f"{service.url}/v2/models/lenet5/infer", json={"inputs": [ZEROS]}, timeout=30).status_code == 200


def test_json_nested_past_the_parser_is_a_400_here_and_on_the_repository_api(service: ServiceProcess) -> None:
    deep = b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    for path in ("/v2/models/lenet5/infer", "/v2/repository/index"):
        response = httpx.post(f"{service.url}{path}", content=deep, timeout=30)
        assert response.status_code == 400 and "nests JSON too deeply" in response.json()["error"], response.text
    flag = httpx.post(f"{service.url}/v2/repository/index", json={"ready": "false"}, timeout=30)
    assert flag.status_code == 400 and "ready must be true or false" in flag.json()["error"]
    large = httpx.post(f"{service.url}/v2/repository/index", content=b" " * (2 << 20), headers=JSON, timeout=30)
    assert large.status_code == 413 and "limit of 1,048,576 (a repository call's, fixed)" in large.json()["error"]


def test_requests_refused_before_a_model_answers_are_counted_for_both_protocols(service: ServiceProcess) -> None:
    """An unknown model (404), a malformed body (400) and a model that failed to load (503), over HTTP and gRPC,
    each count in cnn_requests_total: the error-ratio alert sees v2 and gRPC clients as it sees /classify's."""

    def counts() -> dict[tuple[str, str, str], float]:
        text = httpx.get(f"{service.url}/metrics", timeout=10).text
        return {(labels["model"], labels["protocol"], labels["outcome"]): value
                for labels, value in metric_samples(text, "cnn_requests_total")}  # fmt: skip

    before = counts()
    assert httpx.post(f"{service.url}/v2/models/nope/infer", json={"inputs": [ZEROS]}, timeout=30).status_code == 404
    assert httpx.post(f"{service.url}/v2/models/lenet5/infer", content=b"{", timeout=30).status_code == 400
    assert httpx.post(f"{service.url}/v2/models/ghost/infer", json={"inputs": [ZEROS]}, timeout=30).status_code == 503
    for model in ("nope", "ghost"):
        request = pb.ModelInferRequest(model_name=model)
        request.inputs.add(name="images", datatype="UINT8", shape=[1, 32, 32, 1])
        request.raw_input_contents.append(b"\0" * 1024)
        with pytest.raises(grpc.RpcError):
            _stub(service).ModelInfer(request, timeout=30)
    after = counts()

    def rose(key: tuple[str, str, str]) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert rose(("", "http", "4xx")) == 1 and rose(("lenet5", "http", "4xx")) == 1 and rose(("", "grpc", "4xx")) == 1
    assert rose(("", "http", "5xx")) + rose(("ghost", "http", "5xx")) == 1
    assert rose(("", "grpc", "5xx")) + rose(("ghost", "grpc", "5xx")) == 1


def _invalid(service: ServiceProcess, request: pb.ModelInferRequest) -> str:
    with pytest.raises(grpc.RpcError) as info:
        _stub(service).ModelInfer(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    return str(info.value.details())


def test_grpc_malformed_requests_are_invalid_arguments(service: ServiceProcess) -> None:
    request = pb.ModelInferRequest(model_name="lenet5")
    request.inputs.add(name="images", datatype="UINT8", shape=[1, 32, 32, 1])
    request.raw_input_contents.append(b"\0" * 1024)
    request.outputs.add(name="probabilities").parameters["classification"].string_param = "five"
    assert "classification must be an integer parameter" in _invalid(service, request)

    wraps = pb.ModelInferRequest(model_name="lenet5")
    wraps.inputs.add(name="images", datatype="UINT8", shape=[2**32, 2**32])
    wraps.raw_input_contents.append(b"")
    assert "needs 18446744073709551616 bytes" in _invalid(service, wraps)

    both = pb.ModelInferRequest(model_name="lenet5")  # the raw bytes were taken, the contents ignored
    both.inputs.add(name="images", datatype="UINT8", shape=[1, 32, 32, 1]).contents.uint_contents.extend([0] * 1024)
    both.raw_input_contents.append(b"\0" * 1024)
    assert "has contents while the request has raw_input_contents" in _invalid(service, both)

    large = pb.ModelInferRequest(model_name="lenet5")
    large.inputs.add(name="images", datatype="UINT64", shape=[1]).contents.uint64_contents.append(2**64 - 1)
    assert "must be UINT8, got UINT64" in _invalid(service, large)  # read, not "out of range" past int64

    for version in ("²", "9" * 5000):  # a digit int() refuses; more digits than int() converts
        versioned = pb.ModelInferRequest(model_name="lenet5", model_version=version)
        versioned.inputs.add(name="images", datatype="UINT8", shape=[1, 32, 32, 1])
        versioned.raw_input_contents.append(b"\0" * 1024)
        assert "Model version must be a positive integer" in _invalid(service, versioned)
        with pytest.raises(grpc.RpcError) as info:  # as HTTP's /ready answers 400, not "not ready"
            _stub(service).ModelReady(pb.ModelReadyRequest(name="lenet5", version=version), timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "Model version must be a positive integer" in str(info.value.details())

    request.outputs[0].parameters["classification"].int64_param = 3
    assert list(_stub(service).ModelInfer(request, timeout=30).outputs[0].shape) == [1, 3]


def test_a_version_or_header_length_not_in_ascii_digits_is_a_400(service: ServiceProcess) -> None:
    body = json.dumps({"inputs": [ZEROS]}).encode()
    for version in ("%C2%B2", "9" * 5000):
        answer = httpx.post(f"{service.url}/v2/models/lenet5/versions/{version}/infer", content=body, timeout=30)
        assert answer.status_code == 400 and "Model version must be a positive integer" in answer.json()["error"]
        ready = httpx.get(f"{service.url}/v2/models/lenet5/versions/{version}/ready", timeout=30)
        assert ready.status_code == 400 and "Model version must be a positive integer" in ready.json()["error"]
    for length in (b"\xb2", b"9" * 5000):
        headers = [(b"Content-Type", b"application/octet-stream"), (b"Inference-Header-Content-Length", length)]
        answer = httpx.post(f"{service.url}/v2/models/lenet5/infer", content=body, headers=headers, timeout=30)
        assert answer.status_code == 400 and "does not fit a body" in answer.json()["error"], answer.text


def test_raw_content_length_mismatch_is_invalid(service: ServiceProcess) -> None:
    request = pb.ModelInferRequest(model_name="lenet5")
    request.inputs.add(name="images", datatype="UINT8", shape=[1, 32, 32, 1])
    request.raw_input_contents.append(b"\0" * 100)  # 1024 needed
    with pytest.raises(grpc.RpcError) as info:
        _stub(service).ModelInfer(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "1024" in info.value.details()


def test_typed_contents_are_accepted_and_answered_raw(service: ServiceProcess) -> None:
    pixels = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 1), dtype=np.uint8)
    request = pb.ModelInferRequest(model_name="lenet5", id="req-7")
    tensor = request.inputs.add(name="images", datatype="UINT8", shape=list(pixels.shape))
    tensor.contents.uint_contents.extend(pixels.ravel().tolist())
    request.outputs.add(name="probabilities")
    response = _stub(service).ModelInfer(request, timeout=30)
    assert response.id == "req-7" and response.model_name == "lenet5" and response.model_version == "1"
    (output,) = response.outputs
    assert output.datatype == "FP32" and list(output.shape) == [2, 10]
    probabilities = np.frombuffer(response.raw_output_contents[0], dtype=np.float32).reshape(2, 10)
    np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-5)


def test_long_typed_contents_read_a_step_at_a_time_answer_as_raw_contents(service: ServiceProcess) -> None:
    """Two 224-px images as 301,056 typed values (the server reads them 65,536 at a time): the same answer as the
    same pixels raw, and a value out of range in the last step refused."""
    pixels = np.random.default_rng(2).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    typed, raw = pb.ModelInferRequest(model_name="resnet18"), pb.ModelInferRequest(model_name="resnet18")
    typed.inputs.add(name="images", datatype="UINT8", shape=list(pixels.shape)).contents.uint_contents.extend(
        pixels.ravel().tolist()
    )
    raw.inputs.add(name="images", datatype="UINT8", shape=list(pixels.shape))
    raw.raw_input_contents.append(pixels.tobytes())
    stub = _stub(service)
    answers = [stub.ModelInfer(request, timeout=60).raw_output_contents for request in (typed, raw)]
    assert answers[0] == answers[1] and len(answers[0][0]) == 2 * 1000 * 4
    typed.inputs[0].contents.uint_contents[-1] = 256
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(typed, timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "values out of range for UINT8" in (info.value.details() or "")


def test_32_concurrent_grpc_calls_are_batched(service: ServiceProcess) -> None:
    def batch_metric() -> tuple[float, float]:
        text = httpx.get(f"{service.url}/metrics", timeout=10).text

        def total(name: str) -> float:
            return sum(v for labels, v in metric_samples(text, name) if labels["model"] == "resnet18")

        return total("cnn_batch_size_count"), total("cnn_batch_size_sum")

    def grpc_requests(text: str) -> float:
        return sum(
            v for labels, v in metric_samples(text, "cnn_requests_total")
            if labels["protocol"] == "grpc" and labels["outcome"] == "2xx" and labels["model"] == "resnet18"
        )  # fmt: skip

    calls_before, images_before = batch_metric()
    requests_before = grpc_requests(httpx.get(f"{service.url}/metrics").text)

    async def burst() -> list[pb.ModelInferResponse]:
        async with grpc.aio.insecure_channel(service.grpc_target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            request = pb.ModelInferRequest(model_name="resnet18")
            request.inputs.add(name="image_bytes", datatype="BYTES", shape=[1])
            request.raw_input_contents.append(len(CAT).to_bytes(4, "little") + CAT)
            return await asyncio.gather(*(stub.ModelInfer(request, timeout=60) for _ in range(32)))

    responses = asyncio.run(burst())
    assert len(responses) == 32 and all(r.outputs for r in responses)
    calls_after, images_after = batch_metric()
    assert images_after - images_before == 32
    assert calls_after - calls_before < 32  # several calls shared one session run
    assert grpc_requests(httpx.get(f"{service.url}/metrics").text) - requests_before == 32


def test_grpc_bytes_that_are_no_message_are_invalid_argument_not_unknown(service: ServiceProcess) -> None:
    with grpc.insecure_channel(service.grpc_target) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")  # bytes in, bytes out
        with pytest.raises(grpc.RpcError) as info:
            call(b"\xff\xff\xff", timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert "no valid ModelInferRequest message" in info.value.details()
        live = channel.unary_unary("/inference.GRPCInferenceService/ServerLive")(b"", timeout=10)
        assert pb.ServerLiveResponse.FromString(live).live  # an empty message is a valid request
    assert "DecodeError" not in service.log()
