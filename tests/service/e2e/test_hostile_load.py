"""Hostile clients against the real service (issue #31): heads too large or too slow, bodies that trickle,
more connections than a worker holds, more gRPC calls than it holds, and counters that read 0 rather than
nothing; and gRPC connections asked to reconnect as they age, losing no call."""

from __future__ import annotations

import asyncio
import contextlib
import json
import select
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

# tritonclient's generated messages: the service's own cannot be imported beside them (both register
# inference.* in protobuf's global pool), and other test modules use tritonclient's
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from service.frontends.protocol import OVER_LIMIT_PENDING
from service.store.layout import ModelStore
from tests.helpers import (
    ServiceProcess,
    encode,
    http_codes,
    metric_samples,
    request_outcomes,
    running,
    wait_until,
    whole_response,
    workers,
)

DIGIT = encode(np.full((28, 28), 255, dtype=np.uint8))
PNG = {"Content-Type": "image/png"}
MAX_CONNECTIONS = 40
GRPC_MAX_CONCURRENT_RPCS = 2


@pytest.fixture(scope="module")
def guarded(model_store: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """One worker, short head deadline, few connections and gRPC calls, gRPC connections aged at a second: every
    limit is reached in a second or two."""
    log = tmp_path_factory.mktemp("hostile") / "service.log"
    with running(Path(model_store.root), log, MODELS="lenet5", WORKERS="1", HEADER_TIMEOUT_S="2",
                 MAX_CONNECTIONS=str(MAX_CONNECTIONS), GRPC_MAX_CONCURRENT_RPCS=str(GRPC_MAX_CONCURRENT_RPCS),
                 GRPC_MAX_CONNECTION_AGE_S="1") as process:  # fmt: skip
        yield process


def exchange(service: ServiceProcess, data: bytes, wait: float = 10.0) -> bytes:
    """Send ``data`` on a new connection and read until the server closes it (or ``wait`` passes)."""
    with socket.create_connection(("127.0.0.1", service.port), timeout=wait) as sock:
        with contextlib.suppress(OSError):  # closed while sending: read what it answered
            sock.sendall(data)
        return _read_all(sock)


def exchange_once_held(service: ServiceProcess, data: bytes, seconds: float = 15.0) -> bytes:
    """:func:`exchange`, once a body held on another connection counts: the worker counts it as it parses its head,
    a moment after it was sent, so an answer other than 503 before then is asked again (for ``seconds`` at most)."""
    deadline = time.monotonic() + seconds
    while (
        not (answer := exchange(service, data, wait=3.0)).startswith(b"HTTP/1.1 503 ") and time.monotonic() < deadline
    ):
        time.sleep(0.2)
    return answer


def _read_all(sock: socket.socket) -> bytes:
    answer = b""
    try:
        while chunk := sock.recv(65536):
            answer += chunk
    except OSError:
        pass
    return answer


def _read_one(sock: socket.socket) -> bytes:
    """One response with a Content-Length, head and body, off a connection that stays open."""
    answer = b""

    def more() -> bytes:
        chunk = sock.recv(65536)
        if not chunk:  # the server closed: a failure to show, not a loop for ever
            raise AssertionError(f"the server closed the connection after {answer[:300]!r}")
        return chunk

    while not whole_response(answer):
        answer += more()
    return answer


def status_and_error(answer: bytes) -> tuple[int, str]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)["error"]


def refused(service: ServiceProcess) -> dict[str, float]:
    text = httpx.get(f"{service.url}/metrics", timeout=10).text
    return {labels["reason"]: value for labels, value in metric_samples(text, "cnn_connections_refused_total")}


def assert_serving(service: ServiceProcess) -> None:
    answer = httpx.post(f"{service.url}/classify?model=lenet5", content=DIGIT, headers=PNG, timeout=30)
    assert answer.status_code == 200, answer.text


def test_every_served_versions_counters_exist_at_zero(guarded: ServiceProcess) -> None:
    """Before any request (so, first here): atypical images, explanations, evictions and refusals read 0, so
    no panel says "No data"."""
    text = httpx.get(f"{guarded.url}/metrics", timeout=10).text
    version = {"model": "lenet5", "version": "1"}
    for name, extra in (("cnn_prediction_atypical_total", {}), ("cnn_batch_out_of_memory_total", {}),
                        ("cnn_explanations_total", {"method": "gradcam"}),
                        ("cnn_explanations_total", {"method": "occlusion"})):  # fmt: skip
        found = [value for labels, value in metric_samples(text, name) if labels.items() >= (version | extra).items()]
        assert found == [0.0], (name, extra, found)
    for name, reasons in (("cnn_model_evictions_total", {"pressure", "idle"}),
                          ("cnn_model_loads_total", {"request", "start"})):  # fmt: skip
        seen = {labels["reason"] for labels, _ in metric_samples(text, name) if labels["model"] == "lenet5"}
        assert seen >= reasons, (name, seen)
    assert set(refused(guarded)) == {"connections", "header_bytes", "header_timeout", "body_rate", "body_bytes",
                                     "body_memory", "grpc_calls", "grpc_message_timeout"}  # fmt: skip


@pytest.mark.parametrize("path", ["/classify?model=lenet5", "/v2/models/lenet5/infer"])
def test_a_chunked_body_over_the_limit_gets_413_naming_it(guarded: ServiceProcess, path: str) -> None:
    """22 MiB in 1 MiB chunks against MAX_BODY_BYTES' 20: whether the app or the connection's guard sees the
    excess first, the answer is the body's limit, not the head's."""
    chunk = b"%x\r\n" % (1 << 20) + b"\0" * (1 << 20) + b"\r\n"
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n"
    status, error = status_and_error(exchange(guarded, head.encode() + chunk * 22 + b"0\r\n\r\n"))
    assert status == 413 and "MAX_BODY_BYTES" in error, error
    assert_serving(guarded)


def test_a_head_over_the_limit_gets_431_naming_it(guarded: ServiceProcess) -> None:
    before = refused(guarded)
    big = b"a" * 20_000
    for head in (b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Big: " + big + b"\r\n\r\n",  # one chunk, whole
                 b"GET /livez?" + big + b" HTTP/1.1\r\nHost: x\r\n\r\n"):  # the request line  # fmt: skip
        status, error = status_and_error(exchange(guarded, head))
        assert status == 431 and "MAX_HEADER_BYTES=16384" in error
    # just under the limit is a request like any other
    padded = b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 15_000 + b"\r\nConnection: close\r\n\r\n"
    answer = exchange(guarded, padded)
    assert answer.startswith(b"HTTP/1.1 200")
    assert refused(guarded)["header_bytes"] == before["header_bytes"] + 2
    assert_serving(guarded)


def test_twenty_megabyte_heads_are_never_buffered(guarded: ServiceProcess) -> None:
    """Twenty connections each send a 20 MB header line: each is cut at the limit, the worker does not grow."""
    (worker,) = workers(guarded)
    before = worker.memory_info().rss
    peak, answers = before, []

    def flood() -> None:
        with socket.create_connection(("127.0.0.1", guarded.port), timeout=20) as sock:
            try:
                sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Big: ")
                chunk = b"a" * 65536
                for _ in range(320):  # 20 MiB
                    sock.sendall(chunk)
            except OSError:
                pass
            answers.append(_read_all(sock))

    threads = [threading.Thread(target=flood) for _ in range(20)]
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        peak = max(peak, worker.memory_info().rss)
        time.sleep(0.02)
    assert (peak - before) / 2**20 < 20, f"worker grew {(peak - before) / 2**20:.0f} MiB"
    assert any(a.startswith(b"HTTP/1.1 431") for a in answers)  # the others may have been reset while sending
    assert_serving(guarded)


def test_a_head_that_never_finishes_is_answered_408_and_closed(guarded: ServiceProcess) -> None:
    before = refused(guarded)
    for opening in (b"POST /classify HTTP/1.1\r\nHost: x\r\nX-Slow: a", b""):  # half a head; nothing at all
        started = time.monotonic()
        status, error = status_and_error(exchange(guarded, opening))
        assert status == 408 and "HEADER_TIMEOUT_S=2" in error
        assert 1.5 < time.monotonic() - started < 6
    assert refused(guarded)["header_timeout"] == before["header_timeout"] + 2
    assert_serving(guarded)


def test_expect_100_continue_answered_before_its_body_closes_the_connection(guarded: ServiceProcess) -> None:
    """A 400 on a parameter before the body was asked for (no 100 sent) kept the connection: the body the client
    sends all the same, or its next request, was read as the rest of this one, and the connection hung. A request
    whose body is asked for keeps its connection."""
    head = (b"POST /classify?model=lenet5%s HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n")  # fmt: skip
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=4) as sock:  # before: closed after 5 s
        sock.sendall(head % (b"&top_k=0", len(DIGIT)))
        answer = _read_all(sock)
    status, error = status_and_error(answer)
    assert status == 400 and "top_k" in error and b"connection: close" in answer.lower(), answer
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=10) as sock:
        sock.sendall(head % (b"", len(DIGIT)))
        assert sock.recv(65536).startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(DIGIT)
        first = _read_one(sock)
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
        second = _read_one(sock)
    assert first.startswith(b"HTTP/1.1 200 ") and b"connection: close" not in first.lower(), first
    assert second.startswith(b"HTTP/1.1 200 "), second


def test_the_bodies_a_worker_holds_are_bounded_and_one_alone_is_always_taken(
    model_store: ModelStore, tmp_path: Path
) -> None:
    """Each body is held, and copied as it is parsed, until its request is answered: 32 uploads of 19 MB at once
    grew a worker by 1.7 GB, and 1,024 connections were allowed. Past MAX_BODY_BYTES_IN_FLIGHT (1 MiB here) a
    request gets 503 with Retry-After at its head; a small one still fits, and so does any one alone."""
    size = 800 * 1024

    def head(length: int) -> bytes:
        return (b"POST /classify?model=lenet5 HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                b"Content-Length: %d\r\n\r\n" % length)  # fmt: skip

    env = {"MODELS": "lenet5", "WORKERS": "1", "MAX_BODY_BYTES_IN_FLIGHT": str(1024 * 1024)}
    with running(Path(model_store.root), tmp_path / "bodies.log", **env) as service:
        before = refused(service)
        with socket.create_connection(("127.0.0.1", service.port), timeout=20) as holder:
            holder.sendall(head(size) + b"x" * 1000)  # 800 KiB declared, arriving
            answer = exchange_once_held(service, head(size) + b"x" * size)
            status, error = status_and_error(answer)
            assert status == 503 and "MAX_BODY_BYTES_IN_FLIGHT=1048576; retry" in error, answer[:300]
            assert b"retry-after: 1" in answer.lower()
            small = httpx.post(f"{service.url}/classify?model=lenet5", content=DIGIT, headers=PNG, timeout=30)
            assert small.status_code == 200  # 800 KiB and a few hundred bytes: within
            holder.sendall(b"x" * (size - 1000))  # the rest: answered (no image), its hold let go
            assert _read_one(holder).startswith(b"HTTP/1.1 400 ")
        with socket.create_connection(("127.0.0.1", service.port), timeout=5) as upgrade:
            upgrade.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                            b"Content-Length: %d\r\n\r\n" % size + b"x" * size)  # fmt: skip
            _read_all(upgrade)  # a websocket's: not counted (no cycle would let its body go)
        for length in (size, 3 * 1024 * 1024):  # taken again; and one past the bound, alone
            again = httpx.post(f"{service.url}/classify?model=lenet5", content=b"x" * length, headers=PNG, timeout=30)
            assert again.status_code == 400 and "Cannot decode" in again.json()["error"], again.text
        assert refused(service)["body_memory"] == before["body_memory"] + 1


def test_a_chunked_body_counts_as_it_arrives_and_is_let_go_with_its_answer(
    model_store: ModelStore, tmp_path: Path
) -> None:
    """A body without a declared length counts among the bodies held from its chunks on, until its request ends:
    while 900 KiB of one are held, a request declaring 800 KiB more is refused. Once it is answered, and three
    pipelined requests with bodies after it, the 800 KiB are taken: nothing of theirs is still counted."""
    head = b"POST /classify?model=lenet5 HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
    declared = head + b"Content-Length: %d\r\n\r\n" % (800 * 1024) + b"x" * (800 * 1024)
    chunk = b"x" * (900 * 1024)
    small = head + b"Content-Length: %d\r\n\r\n" % (300 * 1024) + b"x" * (300 * 1024)
    small_chunked = head + b"Transfer-Encoding: chunked\r\n\r\n3e8\r\n" + b"x" * 1000 + b"\r\n0\r\n\r\n"
    env = {"MODELS": "lenet5", "WORKERS": "1", "MAX_BODY_BYTES_IN_FLIGHT": str(1024 * 1024)}
    with running(Path(model_store.root), tmp_path / "chunked.log", **env) as service:
        with socket.create_connection(("127.0.0.1", service.port), timeout=20) as holder:
            holder.sendall(head + b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % len(chunk) + chunk + b"\r\n")
            status, error = status_and_error(exchange_once_held(service, declared))
            assert status == 503 and "MAX_BODY_BYTES_IN_FLIGHT=1048576; retry" in error, error
            holder.sendall(b"0\r\n\r\n")  # its end: answered (no image), its chunks let go
            assert _read_one(holder).startswith(b"HTTP/1.1 400 ")
        with socket.create_connection(("127.0.0.1", service.port), timeout=20) as pipelined:
            last = small.replace(b"Host: x\r\n", b"Host: x\r\nConnection: close\r\n")
            pipelined.sendall(small + small_chunked + last)  # the second and third wait their turn, counted
            answers = _read_all(pipelined)
            assert answers.count(b"HTTP/1.1 400 ") == 3 and answers.count(b"Cannot decode") == 3, answers
        again = httpx.post(f"{service.url}/classify?model=lenet5", content=declared.partition(b"\r\n\r\n")[2],
                           headers=PNG, timeout=30)  # fmt: skip
        assert again.status_code == 400 and "Cannot decode" in again.json()["error"], again.text


def test_no_head_leaves_a_body_counted_or_slips_one_past_the_count(model_store: ModelStore, tmp_path: Path) -> None:
    """Each of these once left MAX_BODY_BYTES_IN_FLIGHT wrong for the worker's life: a head refused after its body
    was counted (a URL llhttp takes and httptools cannot parse: six such heads refused every upload after them),
    and a Content-Length with a trailing space (a length to llhttp, read as none: its body was not counted)."""
    head = b"POST /classify?model=lenet5 HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
    declared = 900 * 1024
    env = {"MODELS": "lenet5", "WORKERS": "1", "MAX_BODY_BYTES_IN_FLIGHT": str(1024 * 1024)}

    def taken() -> httpx.Response:  # alone, 900 KiB is taken, unless more than 124 KiB are still counted
        return httpx.post(f"{service.url}/classify?model=lenet5", content=b"x" * declared, headers=PNG, timeout=30)

    with running(Path(model_store.root), tmp_path / "heads.log", **env) as service:
        answer = exchange(service, b"POST http://x:99999/ HTTP/1.1\r\nHost: x\r\nContent-Length: 921600\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
        assert taken().status_code == 400  # Cannot decode: taken
        with socket.create_connection(("127.0.0.1", service.port), timeout=20) as holder:
            holder.sendall(head + b"Content-Length: 921600 \r\n\r\n" + b"x" * 1000)
            status, error = status_and_error(
                exchange_once_held(service, head + b"Content-Length: %d\r\n\r\n" % declared)
            )
            assert status == 503 and "this worker holds 921,600 bytes" in error, error  # counted


def test_a_body_that_trickles_is_answered_408_and_closed(guarded: ServiceProcess) -> None:
    """10 bytes a second of a 100 kB body: cut at the first 5 s window under MIN_BODY_BYTES_PER_S (1024)."""
    before, codes, outcomes = refused(guarded), http_codes(guarded), request_outcomes(guarded)
    head = (b"POST /classify?model=lenet5 HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            b"Content-Length: 100000\r\n\r\n")  # fmt: skip
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=20) as sock:
        sock.sendall(head + b"x" * 10)
        try:
            while time.monotonic() - started < 20 and not select.select([sock], [], [], 1)[0]:  # until answered
                sock.sendall(b"x" * 10)
        except OSError:
            pass
        answer = _read_all(sock)
    assert time.monotonic() - started < 12
    status, error = status_and_error(answer)
    assert status == 408 and "MIN_BODY_BYTES_PER_S=1024" in error
    assert refused(guarded)["body_rate"] == before["body_rate"] + 1
    # the app, reading the body when the connection refused it, counts what the client got: not 499 nor 500
    wait_until(lambda: http_codes(guarded).get(("/classify", "408"), 0) == codes.get(("/classify", "408"), 0) + 1,
               10, "/classify's 408 counted")  # fmt: skip
    after = request_outcomes(guarded)  # and a 4xx of the request counters, as the client got (it was a 5xx)
    assert (after["4xx"] - outcomes["4xx"], after["5xx"] - outcomes["5xx"]) == (1, 0), (outcomes, after)
    assert_serving(guarded)


@contextlib.contextmanager
def crowded(service: ServiceProcess, past: int = 10) -> Iterator[list[socket.socket]]:
    """``past`` connections more than MAX_CONNECTIONS, sending nothing (each check gets a crowd of its own: the
    ones within the limit are closed after HEADER_TIMEOUT_S, 2 s here)."""
    idle = [socket.create_connection(("127.0.0.1", service.port)) for _ in range(MAX_CONNECTIONS + past)]
    try:
        time.sleep(0.3)
        yield idle
    finally:
        for sock in idle:
            sock.close()


def test_connections_past_the_limit_are_refused_fast_and_held_ones_keep_serving(guarded: ServiceProcess) -> None:
    """Past MAX_CONNECTIONS a request is answered 503 at once, a connection that sends nothing within a second
    too, but a probe's or a scraper's is answered (then closed): a busy worker is not a dead one to the kubelet.
    Past the 16 given that second, a connection gets the 503 at once, as an attacker's flood would."""
    before = refused(guarded)
    warned = guarded.log_path.read_text().count("Invalid HTTP request")
    with httpx.Client(base_url=guarded.url, timeout=30) as held:  # a client that connected first
        assert held.post("/classify?model=lenet5", content=DIGIT, headers=PNG).status_code == 200
        with crowded(guarded) as idle:
            started = time.monotonic()
            head = f"POST /classify?model=lenet5 HTTP/1.1\r\nHost: x\r\nContent-Length: {len(DIGIT)}\r\n\r\n"
            status, error = status_and_error(exchange(guarded, head.encode() + DIGIT))
            assert status == 503 and f"MAX_CONNECTIONS={MAX_CONNECTIONS}" in error
            assert time.monotonic() - started < 1
            assert held.post("/classify?model=lenet5", content=DIGIT, headers=PNG).status_code == 200
            idle[-1].settimeout(5)
            status, error = status_and_error(_read_all(idle[-1]))  # the newest, past the limit, said nothing
            assert status == 503 and f"MAX_CONNECTIONS={MAX_CONNECTIONS}" in error
        for probe in ("/livez", "/readyz", "/metrics"):
            with crowded(guarded):
                answer = exchange(guarded, f"GET {probe} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert answer.startswith(b"HTTP/1.1 200"), (probe, answer[:300])
            assert b"connection: close" in answer.lower()  # past the limit: answered, then closed
        with crowded(guarded, past=OVER_LIMIT_PENDING + 5) as idle:
            idle[-1].settimeout(0.5)  # well before the second the pending ones get
            status, error = status_and_error(_read_all(idle[-1]))
            assert status == 503 and f"MAX_CONNECTIONS={MAX_CONNECTIONS}" in error
    assert guarded.log_path.read_text().count("Invalid HTTP request") == warned  # a refusal is no invalid request
    assert refused(guarded)["connections"] >= before["connections"] + 11
    time.sleep(0.3)
    assert_serving(guarded)


def test_a_large_body_sent_slowly_but_steadily_is_classified(guarded: ServiceProcess) -> None:
    """A 1 MB image in 64 kB pieces every 0.4 s (160 kB/s, 7 s: past a 5 s window) is a client, not an attack."""
    image = encode(np.random.default_rng(0).integers(0, 255, (600, 600, 3), dtype=np.uint8))
    assert len(image) > 1_000_000
    head = (f"POST /classify?model=lenet5 HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            f"Content-Length: {len(image)}\r\nConnection: close\r\n\r\n").encode()  # fmt: skip
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=30) as sock:
        sock.sendall(head)
        for start in range(0, len(image), 65536):
            sock.sendall(image[start : start + 65536])
            time.sleep(0.4)
        answer = _read_all(sock)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]


def test_models_names_the_largest_batch_each_model_runs(guarded: ServiceProcess) -> None:
    """MAX_BATCH_SIZE (32, below the exported config.pbtxt's 64) until a batch runs out of device memory, which
    halves it (tests/service/runtime)."""
    models = httpx.get(f"{guarded.url}/models", timeout=10).json()["models"]
    (lenet,) = [m for m in models if m["name"] == "lenet5"]
    assert lenet["max_batch_size"] == 32


def test_a_pipelined_request_after_a_body_is_not_taken_for_a_long_head(guarded: ServiceProcess) -> None:
    """A body, then the start of the next request in the same chunk: both are answered (the head is counted
    from where it begins, not from the chunk's start)."""
    image = encode(np.random.default_rng(1).integers(0, 255, (200, 200, 3), dtype=np.uint8))
    assert len(image) > 16 * 1024
    first = (f"POST /classify?model=lenet5 HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
             f"Content-Length: {len(image)}\r\n\r\n").encode() + image  # fmt: skip
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=10) as sock:
        sock.sendall(first + b"GET /livez HTTP/1.1\r\nHo")
        time.sleep(0.1)
        sock.sendall(b"st: x\r\nConnection: close\r\n\r\n")
        answer = _read_all(sock)
    assert answer.count(b"HTTP/1.1 200") == 2, answer[:400]


def test_a_kept_alive_connection_that_only_trickles_line_ends_is_closed(guarded: ServiceProcess) -> None:
    """Line ends between requests begin none, but do cancel uvicorn's keep-alive timer: the head deadline
    still closes the connection."""
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=10) as sock:
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        started, closed = time.monotonic(), False
        while time.monotonic() - started < 8 and not closed:
            try:
                sock.sendall(b"\r\n")
                sock.settimeout(0.5)
                closed = sock.recv(4096) == b""
            except TimeoutError:
                continue
            except OSError:
                closed = True
    assert closed and time.monotonic() - started < 5


def _digits_request(count: int) -> pb.ModelInferRequest:
    """``count`` digit PNGs as one ModelInfer call: each call holds the worker for a few milliseconds."""
    request = pb.ModelInferRequest(model_name="lenet5")
    request.inputs.add(name="image_bytes", datatype="BYTES", shape=[count])
    request.raw_input_contents.append(b"".join(len(DIGIT).to_bytes(4, "little") + DIGIT for _ in range(count)))
    return request


def test_grpc_calls_past_the_limit_are_refused_resource_exhausted_and_the_rest_answered(
    guarded: ServiceProcess,
) -> None:
    """Bursts of 16 calls at once on one connection, against GRPC_MAX_CONCURRENT_RPCS=2: those past the limit
    get RESOURCE_EXHAUSTED (safe to retry) naming the setting, each counted in /metrics; every other one its
    answer, and the port serves on."""
    before = refused(guarded).get("grpc_calls", 0.0)
    details: set[str] = set()

    async def burst() -> list[grpc.StatusCode]:
        async with grpc.aio.insecure_channel(guarded.grpc_target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            await stub.ServerLive(pb.ServerLiveRequest(), timeout=10)  # connected before the burst
            request = _digits_request(32)

            async def call() -> grpc.StatusCode:
                try:
                    response = await stub.ModelInfer(request, timeout=30)
                except grpc.aio.AioRpcError as exc:
                    details.add(exc.details() or "")
                    return exc.code()
                assert response.outputs[0].shape == [32, 10]
                return grpc.StatusCode.OK

            return list(await asyncio.gather(*(call() for _ in range(16))))

    codes: list[grpc.StatusCode] = []
    for _ in range(5):  # one burst is almost always enough; the limit must show within five
        codes += asyncio.run(burst())
        if grpc.StatusCode.RESOURCE_EXHAUSTED in codes:
            break
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    assert codes.count(grpc.StatusCode.OK) >= GRPC_MAX_CONCURRENT_RPCS
    assert details == {f"This worker holds GRPC_MAX_CONCURRENT_RPCS={GRPC_MAX_CONCURRENT_RPCS} calls already; "
                       "send it again (it changed nothing)"}  # fmt: skip
    assert refused(guarded)["grpc_calls"] - before == codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
    with grpc.insecure_channel(guarded.grpc_target) as channel:
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(_digits_request(1), timeout=30)
    assert response.outputs[0].shape == [1, 10]


def test_a_worker_that_holds_all_its_grpc_calls_still_answers_health_calls(guarded: ServiceProcess) -> None:
    """Both GRPC_MAX_CONCURRENT_RPCS places held (by calls whose message has not come): a ModelInfer is refused,
    ServerLive and ServerReady are answered true, as /livez and /readyz would be; once the held calls go, the worker
    takes ModelInfer again."""

    async def scenario() -> None:
        async with grpc.aio.insecure_channel(guarded.grpc_target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            await stub.ServerLive(pb.ServerLiveRequest(), timeout=10)  # connected, so the held calls go first
            infer = channel.stream_unary(
                "/inference.GRPCInferenceService/ModelInfer",
                request_serializer=pb.ModelInferRequest.SerializeToString,
                response_deserializer=pb.ModelInferResponse.FromString,
            )
            never = asyncio.Event()

            async def no_message() -> AsyncIterator[pb.ModelInferRequest]:  # headers, and never the message
                await never.wait()
                yield _digits_request(1)

            held = [asyncio.ensure_future(infer(no_message(), timeout=60)) for _ in range(GRPC_MAX_CONCURRENT_RPCS)]
            deadline = time.monotonic() + 30
            while True:  # the worker counts a call as its headers arrive, a moment after they are sent
                try:
                    await stub.ModelInfer(_digits_request(1), timeout=10)
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                    break
                assert time.monotonic() < deadline, "the held calls never filled the worker's places"
                await asyncio.sleep(0.05)
            assert not any(call.done() for call in held), held  # the places are theirs
            assert (await stub.ServerLive(pb.ServerLiveRequest(), timeout=10)).live
            assert (await stub.ServerReady(pb.ServerReadyRequest(), timeout=10)).ready
            ready = health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService")
            checked = await health_pb2_grpc.HealthStub(channel).Check(ready, timeout=10)
            assert checked.status == health_pb2.HealthCheckResponse.SERVING
            for call in held:
                call.cancel()
            deadline = time.monotonic() + 30
            while True:  # each cancelled call gives its place back as the worker sees the cancel
                try:
                    response = await stub.ModelInfer(_digits_request(1), timeout=10)
                    break
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline, exc
                    await asyncio.sleep(0.05)
            assert list(response.outputs[0].shape) == [1, 10]

    asyncio.run(scenario())


def test_an_aged_grpc_connection_is_replaced_without_losing_a_call(guarded: ServiceProcess) -> None:
    """GRPC_MAX_CONNECTION_AGE_S=1: over seconds of calls on one channel, the client is asked to reconnect and
    does (its connections to the gRPC port come from new local ports), and every call is answered."""
    me, ports = psutil.Process(), set()
    calls = 0
    with grpc.insecure_channel(guarded.grpc_target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        end = time.monotonic() + 30  # two replacements take about 2 s; a busy machine calls less often
        while time.monotonic() < end and len(ports) < 3:
            response = stub.ModelInfer(_digits_request(1), timeout=30)  # raises on any failed call
            assert response.outputs[0].shape == [1, 10]
            calls += 1
            ports |= {c.laddr.port for c in me.net_connections("tcp") if c.raddr and c.raddr.port == guarded.grpc_port}
            time.sleep(0.02)
    assert len(ports) >= 3, (calls, ports)  # at least two replacements (1 s, +-10%), none failing a call


def test_a_grpc_message_over_max_body_bytes_is_refused_resource_exhausted(service: ServiceProcess) -> None:
    """On the session's service, whose gRPC connections are aged at 300 s: at ``guarded``'s 1 s, a GOAWAY met the
    20 MB message being sent, and the refusal reached the client as the closed socket's UNAVAILABLE (CI saw it)."""
    request = pb.ModelInferRequest(model_name="lenet5")
    request.inputs.add(name="image_bytes", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(bytes(20 * 1024 * 1024 + 1))  # MAX_BODY_BYTES's default, and a byte
    options = [("grpc.max_send_message_length", 64 << 20)]
    with grpc.insecure_channel(service.grpc_target, options=options) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(request, timeout=30)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value
        assert "larger than max" in (refused.value.details() or ""), refused.value.details()
        assert stub.ModelInfer(_digits_request(1), timeout=30).outputs[0].shape == [1, 10]
