"""Downloads against real local servers: one that never answers, one that cuts its body short, one that fails
once, one that says 404. Each gives up or goes on as a user waiting on `make export` would want."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
import urllib.error
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch

import export.download as download_module
from export.download import IncompleteDownload, download
from export.spec import ReleasedWeights
from export.weights import WeightsIntegrityError, WeightsUnavailableError, fetch_released, load_state_dict


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(download_module, "FIRST_BACKOFF_S", 0.01)
    monkeypatch.setattr(download_module, "_silent", set())


class Scripted(BaseHTTPRequestHandler):
    """Answers each GET with the next of the server's ``script``: (status, body, the length it claims), and
    optionally the seconds between the body's bytes (a trickle)."""

    def do_GET(self) -> None:
        server: Any = self.server
        server.requests += 1
        status, body, claimed, *trickle = server.script[min(server.requests, len(server.script)) - 1]
        self.send_response(status)
        self.send_header("Content-Length", str(claimed))
        self.end_headers()
        try:
            for piece in [body[i : i + 1] for i in range(len(body))] if trickle else [body]:
                self.wfile.write(piece)
                self.wfile.flush()
                time.sleep(trickle[0] if trickle else 0)
        except OSError:  # the client gave up
            pass
        self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def scripted() -> Iterator[Any]:
    server: Any = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    server.requests, server.script = 0, []
    server.url = f"http://127.0.0.1:{server.server_address[1]}/weights-0123abcd.pth"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_a_server_that_never_answers_is_given_up_on_after_each_try_times_out(tmp_path: Path) -> None:
    """The connection opens (a proxy or firewall that drops the traffic) and nothing comes: each try waits the
    time-out, not for ever, every try is made, and a later download from that host fails at once."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    host = f"http://127.0.0.1:{listener.getsockname()[1]}"
    started = time.monotonic()
    with pytest.raises((TimeoutError, urllib.error.URLError)):
        download(f"{host}/w.pth", tmp_path / "w", progress=False, timeout=0.5, attempts=2)
    assert time.monotonic() - started < 10 and len(held) == 2
    started = time.monotonic()  # the next network's weights, from the same host: not waited for again
    with pytest.raises(TimeoutError, match="did not answer an earlier download"):
        download(f"{host}/v.pth", tmp_path / "v", progress=False, timeout=0.5, attempts=2)
    assert time.monotonic() - started < 0.5 and len(held) == 2
    listener.close()
    for connection in held:
        connection.close()


def test_a_body_cut_short_is_tried_again_and_then_called_unavailable_not_tampered(
    scripted: Any, tmp_path: Path
) -> None:
    scripted.script = [(200, b"x" * 100, 1000)]
    with pytest.raises(IncompleteDownload, match="after 100 of 1000 bytes"):
        download(scripted.url, tmp_path / "w", progress=False, attempts=2)
    assert scripted.requests == 2
    release = ReleasedWeights(url=scripted.url, top1=0.0)
    with pytest.raises(WeightsUnavailableError, match="IncompleteDownload") as info:  # skipped by `default`
        fetch_released(release, cache_dir=tmp_path / "cache", progress=False)
    assert not isinstance(info.value, WeightsIntegrityError) and list((tmp_path / "cache").iterdir()) == []


def test_a_server_error_is_tried_again_and_the_file_fetched(scripted: Any, tmp_path: Path) -> None:
    weights = tmp_path / "w.pth"
    torch.save({"w": torch.arange(3.0)}, weights)
    body = weights.read_bytes()
    prefix = hashlib.sha256(body).hexdigest()[:8]
    scripted.url = scripted.url.replace("0123abcd", prefix)
    scripted.script = [(503, b"busy", 4), (200, body, len(body))]
    fetched = fetch_released(ReleasedWeights(url=scripted.url, top1=0.0), cache_dir=tmp_path / "cache",
                             progress=False)  # fmt: skip
    assert scripted.requests == 2 and fetched.read_bytes() == body
    assert torch.equal(load_state_dict(fetched)["w"], torch.arange(3.0))
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [fetched.name]  # no .partial left beside it


def test_a_404_is_not_tried_again(scripted: Any, tmp_path: Path) -> None:
    scripted.script = [(404, b"no", 2)]
    with pytest.raises(urllib.error.HTTPError):
        download(scripted.url, tmp_path / "w", progress=False, attempts=3)
    assert scripted.requests == 1


def test_a_refused_connection_is_not_tried_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing listens (offline behind a proxy that is not there): one try, at once, so `make export` offline
    skips the ImageNet networks in a second, as it always did."""
    monkeypatch.setattr(download_module, "FIRST_BACKOFF_S", 2.0)  # a second try would show: 2 s first
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    started = time.monotonic()
    with pytest.raises(urllib.error.URLError) as info:
        download(f"http://127.0.0.1:{port}/w.pth", tmp_path / "w", progress=False, attempts=3)
    assert isinstance(info.value.reason, ConnectionRefusedError) and time.monotonic() - started < 1


def test_a_body_that_trickles_is_given_up_on_and_its_host_not_called_silent(scripted: Any, tmp_path: Path) -> None:
    """A byte every 0.1 s never lets a read wait its time-out, yet brings nothing: under 64 KiB in the time-out's
    span fails the try. Two 503s then such a trickle: the host answered each try, so a later download from it
    is still made."""
    scripted.script = [(503, b"busy", 4), (503, b"busy", 4), (200, b"x" * 100, 100_000, 0.1)]
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="under 64 KiB in 1 s"):
        download(scripted.url, tmp_path / "w", progress=False, timeout=1.0, attempts=3)
    assert 1.0 < time.monotonic() - started < 5 and scripted.requests == 3
    scripted.script = [(200, b"whole", 5)]
    scripted.requests = 0
    download(scripted.url, tmp_path / "v", progress=False, timeout=1.0, attempts=1)
    assert (tmp_path / "v").read_bytes() == b"whole"
