"""The HTTP stack around the handlers: what BentoML still does, what the service does instead.

BentoML's request metrics, access log and OpenTelemetry spans are off (they cost more than
LeNet-5's inference); the service's own middlewares give every answer an ``X-Request-ID``,
count requests by route, write JSON access lines (``ACCESS_LOG=json``) and export spans
(``TRACING=otlp``) to a collector. BentoML's timeout still holds.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import psutil
import pytest
import tritonclient.grpc as triton_grpc
from skimage import data
from tritonclient.utils import InferenceServerException

from service.store.layout import ModelStore

from ...helpers import (
    ROOT,
    ServiceProcess,
    encode,
    free_port,
    http_codes,
    metric_samples,
    request_outcomes,
    running,
    wait_until,
    whole_response,
    workers,
)

DIGIT = encode(np.pad(np.full((20, 4), 255, dtype=np.uint8), 4))
PNG = {"Content-Type": "image/png"}


STACK = """
import json
from service.service import CNNClassifier
app = CNNClassifier.to_asgi(is_main=True)  # what BentoML's worker serves
otel = app.user_middleware[0]
paths = ("/classify", "/v2/models/lenet5/infer", "/models", "/")
print(json.dumps({
    "middlewares": [f"{m.cls.__module__}.{m.cls.__name__}" for m in app.user_middleware],
    "otel_excludes": [otel.kwargs["excluded_urls"].url_disabled(f"http://127.0.0.1:3000{p}") for p in paths],
    "routes": [getattr(route, "path", None) for route in app.router.routes],
}))
"""


def test_bentoml_runs_only_what_the_service_relies_on(tmp_path: Path) -> None:
    """Fails when a BentoML upgrade changes the stack: the middlewares in front of ours, and their settings.

    In a process of its own: tritonclient, imported here, registers the same protobuf messages as ours.
    """
    env = {**os.environ, "BENTOML_HOME": str(tmp_path), "MODEL_STORE": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", STACK], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    stack = json.loads(result.stdout.strip().splitlines()[-1])
    # no request metrics, no access log: BentoML's OpenTelemetry, our timeout where BentoML builds its own,
    # our middlewares, then BentoML's context
    assert stack["middlewares"] == [
        "opentelemetry.instrumentation.asgi.OpenTelemetryMiddleware",
        "service.frontends.timeout.RequestTimeout",  # in place of BentoML's, which kept every request's timer
        "service.frontends.observe.RequestObserver",
        "service.frontends.fastpath.FastPathMiddleware",
        "service.frontends.fastpath.JsonNotFound",  # what the fast path does not answer: BentoML's 404 as JSON
        "_bentoml_impl.server.app.ContextMiddleware",
    ], stack["middlewares"]
    assert all(stack["otel_excludes"])  # OpenTelemetry's middleware returns at its first check
    assert "/metrics" not in stack["routes"] and "/readyz" in stack["routes"]  # BentoML's /metrics is off


def test_the_workers_run_on_uvloop_and_httptools(service: ServiceProcess) -> None:
    """uvicorn takes them only if they import (BentoML does not ask for them): they are the service's own pins."""
    assert service.process is not None
    workers = [p for p in psutil.Process(service.process.pid).children(recursive=True)
               if any("_bentoml_impl.worker" in part for part in p.cmdline())]  # fmt: skip
    assert workers
    for worker in workers:
        mapped = Path(f"/proc/{worker.pid}/maps").read_text()
        assert "uvloop/loop." in mapped and "httptools/parser/parser." in mapped


def test_every_answer_carries_a_request_id(service: ServiceProcess) -> None:
    mine = {"X-Request-ID": "order-7f3a:retry-2"}
    answered = httpx.post(f"{service.url}/classify?model=lenet5", content=DIGIT, headers=PNG | mine, timeout=30)
    assert answered.status_code == 200 and answered.headers["x-request-id"] == "order-7f3a:retry-2"
    made = [httpx.post(f"{service.url}/classify?model=lenet5", content=DIGIT, headers=PNG, timeout=30) for _ in "ab"]
    ids = [r.headers["x-request-id"] for r in made]
    assert ids[0] != ids[1] and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)  # new ones, unique
    for url, method in ((f"{service.url}/classify?model=ghost", "POST"), (f"{service.url}/models", "GET"),
                        (f"{service.url}/readyz", "GET"), (f"{service.url}/nowhere", "GET")):  # fmt: skip
        response = httpx.request(method, url, content=DIGIT if method == "POST" else None, headers=mine, timeout=30)
        assert response.headers["x-request-id"] == mine["X-Request-ID"], (url, response.status_code)
    for bad in ("x" * 129, "two words", "tab\there"):  # not echoed: a log line or header must not carry them
        response = httpx.get(f"{service.url}/models", headers={"X-Request-ID": bad}, timeout=30)
        assert response.headers["x-request-id"] != bad and len(response.headers["x-request-id"]) == 32


def test_http_requests_are_counted_by_route_template_never_by_path(service: ServiceProcess) -> None:
    before = http_codes(service)
    httpx.post(f"{service.url}/classify?model=lenet5", content=DIGIT, headers=PNG, timeout=30)
    httpx.get(f"{service.url}/v2/models/lenet5", timeout=30)
    httpx.get(f"{service.url}/no/such/path-{time.time()}", timeout=30)
    after = http_codes(service)
    for key in (("/classify", "200"), ("/v2/models/{name}", "200"), ("unmatched", "404")):
        assert after.get(key, 0) - before.get(key, 0) == 1, key
    assert not any("such" in route for route, _ in after)


def test_a_client_gone_before_its_body_arrived_is_a_499_not_a_500(service: ServiceProcess) -> None:
    """Content-Length 1000, 100 bytes, then the socket closes: on the fast path (/classify) and through FastAPI
    (/explain), counted as nginx counts a client's close, with no error in the log, and as no outcome of the
    request counters (it counted as a 5xx, which CNNErrorRatioHigh reads)."""

    before, outcomes = http_codes(service), request_outcomes(service)
    for path in ("/classify?model=lenet5", "/explain?model=lenet5"):
        with socket.create_connection(("127.0.0.1", service.port), timeout=30) as connection:
            head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n"
            connection.sendall(head.encode() + DIGIT[:100])
    routes = ("/classify", "/explain")
    counted = lambda: all(http_codes(service).get((r, "499"), 0) > before.get((r, "499"), 0) for r in routes)  # noqa: E731
    wait_until(counted, 10, "499s")
    after = http_codes(service)
    assert all(after.get((r, "500"), 0) == before.get((r, "500"), 0) for r in routes), after
    assert request_outcomes(service) == outcomes
    assert "ClientDisconnect" not in service.log() and "Unhandled error" not in service.log()


def slow_upload(port: int, seconds: float) -> tuple[float, bytes]:
    """A POST whose body arrives over ``seconds``; when the answer came, and the answer."""
    body = DIGIT
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        started = time.monotonic()
        head = (f"POST /classify?model=lenet5 HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                f"Content-Length: {len(body)}\r\n\r\n")  # fmt: skip
        connection.sendall(head.encode())
        connection.settimeout(0.1)
        answer = b""
        for i in range(len(body)):
            if time.monotonic() - started > seconds:
                break
            try:
                connection.sendall(body[i : i + 1])
            except OSError:  # the server closed the connection after answering
                break
            try:
                answer += connection.recv(65536)
                if answer:
                    break
            except TimeoutError:
                pass
            time.sleep(seconds / len(body))
        connection.settimeout(30)
        while not whole_response(answer):  # the head and the body can come in separate packets
            try:
                chunk = connection.recv(65536)
            except ConnectionResetError:  # closed with our body unread: what came before is the answer
                break
            if not chunk:
                break
            answer += chunk
        return time.monotonic() - started, answer


def idle(service: ServiceProcess) -> bool:
    """Whether the workers used under a tenth of a core over the last half second."""
    processes = workers(service)
    before = sum(sum(p.cpu_times()[:2]) for p in processes)
    time.sleep(0.5)
    return sum(sum(p.cpu_times()[:2]) for p in processes) - before < 0.05


def test_a_request_over_the_timeout_gets_504_or_408_where_its_body_was_late(
    model_store: ModelStore, tmp_path: Path
) -> None:
    """The service's slowness is a 504 and a 5xx of the request counters (CNNErrorRatioHigh reads them: it counted
    as nothing, as a client gone); a body still arriving at the timeout is the client's: 408, a 4xx (it was a 504)."""
    env = {"MODELS": "lenet5,resnet18", "REQUEST_TIMEOUT_S": "0.5"}
    with running(Path(model_store.root), tmp_path / "timeout.log", **env) as service:
        took, answer = slow_upload(service.port, seconds=4)
        status = answer.split(b"\r\n", 1)[0]
        assert b" 408 " in status and b"body did not arrive within 0.5 seconds" in answer, answer[:300]
        assert b"connection: close" in answer.lower()  # the rest of the body is not read as the next request
        assert re.search(rb"\r\nx-request-id: [0-9a-f]{32}\r\n", answer.lower()), answer[:300]  # as every answer
        assert took < 3.5  # answered at the timeout, not when the body was done
        photos = [("image", (f"{i}.jpg", encode(data.chelsea(), "JPEG"), "image/jpeg")) for i in range(64)]
        slow = httpx.post(f"{service.url}/classify?model=resnet18", files=photos, headers={"X-Request-ID": "late-1"},
                          timeout=30)  # about 1 s of work  # fmt: skip
        assert slow.status_code == 504 and "Not able to process the request in 0.5 seconds" in slow.json()["error"]
        assert slow.headers.get("x-request-id") == "late-1"  # the client's, echoed
        # its decoding (and any batch) runs on after the answer, on both cores: the next request's 0.5 s begin once
        # the workers are idle again
        wait_until(lambda: idle(service), 60, "the workers idle after the 504's work")
        after = httpx.post(f"{service.url}/classify?model=lenet5", content=DIGIT, headers=PNG, timeout=30)
        assert after.status_code == 200
        counted = http_codes(service)
        assert (counted.get(("/classify", "408")), counted.get(("/classify", "504"))) == (1, 1)
        outcomes = request_outcomes(service)
        assert outcomes == {"2xx": 1, "4xx": 1, "5xx": 1}, outcomes

        # gRPC, timed from the call's start as well: headers and a message that never comes, then work too long
        with grpc.insecure_channel(service.grpc_target) as channel:
            silent = threading.Event()

            def nothing() -> Iterator[bytes]:
                silent.wait(30)
                yield b""

            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as late:
                channel.stream_unary("/inference.GRPCInferenceService/ModelInfer")(nothing(), timeout=30)
            took = time.monotonic() - started
            silent.set()
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, late.value
        assert "message did not arrive within 0.5 seconds (REQUEST_TIMEOUT_S)" in late.value.details() and took < 5
        files = triton_grpc.InferInput("image_bytes", [64], "BYTES")
        files.set_data_from_numpy(np.array([photo for _, (_, photo, _) in photos], dtype=object))
        with pytest.raises(InferenceServerException) as slow_call:
            triton_grpc.InferenceServerClient(service.grpc_target).infer("resnet18", [files], client_timeout=30)
        assert slow_call.value.status() == "StatusCode.DEADLINE_EXCEEDED", slow_call.value
        assert "Not able to process the call in 0.5 seconds (REQUEST_TIMEOUT_S)" in str(slow_call.value)
        wait_until(lambda: idle(service), 60, "the workers idle after the cut call's work")
        text = httpx.get(f"{service.url}/metrics", timeout=10).text
        refused = {labels["reason"]: value for labels, value in metric_samples(text, "cnn_connections_refused_total")}
        assert refused["grpc_message_timeout"] == 1
        assert request_outcomes(service) == {"2xx": 1, "4xx": 1, "5xx": 2}  # the cut call, as the 504


def test_access_log_json_lines_parse_and_say_what_happened(model_store: ModelStore, tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    with running(Path(model_store.root), log, MODELS="lenet5", ACCESS_LOG="json") as service:
        ok = httpx.post(f"{service.url}/classify?model=lenet5", content=DIGIT, headers=PNG, timeout=30)
        unknown = httpx.post(f"{service.url}/classify?model=ghost", content=DIGIT, headers=PNG, timeout=30)
        bad = httpx.post(f"{service.url}/classify?model=lenet5&top_k=0", content=DIGIT, headers=PNG, timeout=30)
        client = triton_grpc.InferenceServerClient(service.grpc_target)  # gRPC has no HTTP access line
        files = triton_grpc.InferInput("image_bytes", [1], "BYTES")
        files.set_data_from_numpy(np.array([DIGIT], dtype=object))
        client.infer("lenet5", [files])
        time.sleep(0.5)
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    by_id = {line["request_id"]: line for line in lines}
    first = by_id[ok.headers["x-request-id"]]
    assert first["route"] == "/classify" and first["status"] == 200 and first["method"] == "POST"
    assert (first["model"], first["version"], first["images"]) == ("lenet5", "1", 1) and 0 < first["seconds"] < 30
    assert by_id[unknown.headers["x-request-id"]]["status"] == 404
    assert by_id[bad.headers["x-request-id"]]["status"] == 400
    assert {"time", "path"} <= first.keys()


class Collector:
    """An OTLP/HTTP trace receiver: keeps every span it is sent."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        self.spans: list[Any] = []
        collector = self

        class Receive(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest.FromString(body)
                for resource in request.resource_spans:
                    for scope in resource.scope_spans:
                        collector.spans.extend(scope.spans)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Receive)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def trace(self, trace_id: str) -> list[Any]:
        return [s for s in self.spans if s.trace_id.hex() == trace_id]


@pytest.fixture
def collector() -> Iterator[Collector]:
    receiver = Collector()
    yield receiver
    receiver.server.shutdown()


def test_tracing_exports_a_span_per_stage_continuing_the_callers_trace(
    model_store: ModelStore, tmp_path: Path, collector: Collector
) -> None:
    env = {"MODELS": "lenet5", "TRACING": "otlp", "OTLP_ENDPOINT": collector.url, "OTEL_BSP_SCHEDULE_DELAY": "200"}
    with running(Path(model_store.root), tmp_path / "traced.log", **env) as service:
        callers = [(f"{i:032x}", f"{i:016x}") for i in range(1, 13)]  # (trace id, the caller's span id)

        def post(trace_id: str, span_id: str) -> httpx.Response:
            headers = PNG | {"traceparent": f"00-{trace_id}-{span_id}-01"}
            return httpx.post(f"{service.url}/classify?model=lenet5", content=DIGIT, headers=headers, timeout=30)

        threads = [threading.Thread(target=post, args=caller) for caller in callers[:-1]]  # together: batches
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        grpc_trace, grpc_parent = callers[-1]
        client = triton_grpc.InferenceServerClient(service.grpc_target)
        files = triton_grpc.InferInput("image_bytes", [1], "BYTES")
        files.set_data_from_numpy(np.array([DIGIT], dtype=object))
        client.infer("lenet5", [files], headers={"traceparent": f"00-{grpc_trace}-{grpc_parent}-01"})
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not all(len(collector.trace(t)) >= 4 for t, _ in callers):
            time.sleep(0.2)

    infer_spans = [s for s in collector.spans if s.name == "infer"]
    for trace_id, parent in callers:
        spans = {s.name: s for s in collector.trace(trace_id)}
        server = spans.get("POST /classify") or spans.get("ModelInfer")
        assert server is not None, [s.name for s in collector.trace(trace_id)]
        assert server.parent_span_id.hex() == parent  # the caller's span is the parent: the trace goes on
        for stage in ("decode", "queue", "postprocess"):
            assert spans[stage].parent_span_id == server.span_id, stage
            assert server.start_time_unix_nano <= spans[stage].start_time_unix_nano <= server.end_time_unix_nano
        # the batch's one infer span is linked to every request it served
        linked = [s for s in infer_spans if any(link.span_id == server.span_id for link in s.links)]
        assert len(linked) == 1, trace_id
        assert spans["queue"].end_time_unix_nano == linked[0].start_time_unix_nano
        attributes = {a.key: a.value for a in linked[0].attributes}
        assert attributes["model"].string_value == "lenet5" and attributes["batch.size"].int_value >= 1
    print(f"\n{len(infer_spans)} infer spans for {len(callers)} requests; "
          f"requests per batch: {sorted(len(s.links) for s in infer_spans)}")  # fmt: skip
