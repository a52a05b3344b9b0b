"""``python -m client`` and ``Client`` against the real service, on a folder of real photos.

Every answer is compared with ``/classify``'s for the same bytes. The retry and token
paths use a small stub server on loopback: they test the client's own behaviour, not
the service's.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import email.utils
import fcntl
import json
import os
import re
import select
import struct
import subprocess
import sys
import termios
import threading
import time
import tomllib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from skimage import data

from client import Client
from client.api import ServiceUnavailableError, _retry_after
from client.files import expand

from ..helpers import ROOT, ServiceProcess, classified, encode, free_port

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real photos in nested folders, a broken JPEG, and a text file that is no image."""
    root = tmp_path_factory.mktemp("photos")
    (root / "animals").mkdir()
    (root / "things" / "deeper").mkdir(parents=True)
    (root / "animals" / "chelsea.jpg").write_bytes(encode(data.chelsea(), "JPEG", quality=90))
    (root / "things" / "coffee.png").write_bytes(encode(data.coffee()))
    (root / "things" / "deeper" / "rocket.JPG").write_bytes(encode(data.rocket(), "JPEG"))
    (root / "astronaut.webp").write_bytes(encode(data.astronaut(), "WEBP"))
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    (root / "notes.txt").write_text("not an image, and folders are searched by extension")
    return root


def run_client(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "client", *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env
    )


def test_a_folder_is_classified_in_order_with_the_services_answers(service: ServiceProcess, photos: Path) -> None:
    result = run_client(str(photos), "--url", service.url, "--model", "resnet18", "--format", "jsonl",
                        "--concurrency", "3")  # fmt: skip
    assert result.returncode == 1, result.stderr  # the broken file
    assert "1 of 5 files failed" in result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    names = [Path(row["path"]).relative_to(photos).as_posix() for row in rows]
    assert names == ["animals/chelsea.jpg", "astronaut.webp", "broken.jpg", "things/coffee.png",
                     "things/deeper/rocket.JPG"]  # fmt: skip
    for row in rows:
        if row["path"].endswith("broken.jpg"):
            assert row["status"] == 400 and "Cannot decode the image" in row["error"]
            continue
        expected = classified(service, Path(row["path"]).read_bytes(), "resnet18")
        assert (row["model"], row["version"]) == (expected["model"], expected["version"])
        assert row["predictions"] == expected["results"][0]["predictions"]


def test_explain_writes_each_images_heat_map_beside_the_results(
    service: ServiceProcess, photos: Path, tmp_path: Path
) -> None:
    twice = photos / "animals" / "coffee.png"  # a stem twice
    twice.write_bytes((photos / "things" / "coffee.png").read_bytes())
    try:
        result = run_client(str(photos), "--url", service.url, "--model", "resnet18", "--format", "jsonl",
                            "--explain", str(tmp_path / "heat"))  # fmt: skip
        assert result.returncode == 1, result.stderr  # the broken file, as without --explain
        rows = {Path(r["path"]).relative_to(photos).as_posix(): r for r in map(json.loads, result.stdout.splitlines())}
        assert "explanation" not in rows.pop("broken.jpg")
        written = sorted(p.name for p in (tmp_path / "heat").iterdir())
        assert written == ["astronaut.png", "chelsea.png", "coffee-2.png", "coffee.png", "rocket.png"]
        for name, row in rows.items():
            top = row["predictions"][0]["index"]
            headers = {"Content-Type": "application/octet-stream", "Accept": "image/png"}
            url = f"{service.url}/explain?model=resnet18&class={top}"
            expected = httpx.post(url, content=(photos / name).read_bytes(), headers=headers, timeout=60)
            assert Path(row["explanation"]).read_bytes() == expected.content, name
    finally:
        twice.unlink()


def test_csv_to_a_file_with_a_glob_and_the_default_model(service: ServiceProcess, photos: Path, tmp_path: Path) -> None:
    output = tmp_path / "labels.csv"
    result = run_client(f"{photos}/**/*.jpg", "--url", service.url, "--format", "csv", "--top-k", "3",
                        "--output", str(output))  # fmt: skip
    assert result.returncode == 1  # broken.jpg
    chelsea, broken = csv.DictReader(output.open())
    assert Path(broken["path"]).name == "broken.jpg" and "Cannot decode" in broken["error"]
    assert Path(chelsea["path"]).name == "chelsea.jpg" and chelsea["error"] == ""
    expected = classified(service, Path(chelsea["path"]).read_bytes(), "resnet18")  # the service's default
    top = expected["results"][0]["predictions"]
    assert [chelsea[f"label_{k}"] for k in (1, 2, 3)] == [p["label"] for p in top[:3]]
    assert float(chelsea["score_1"]) == top[0]["score"]
    assert "label_4" not in chelsea


def test_the_table_names_model_and_version(service: ServiceProcess, photos: Path) -> None:
    result = run_client(str(photos / "things"), "--url", service.url, "--model", "lenet5", "--top-k", "2")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and all(" lenet5 v1 " in line for line in lines)
    assert lines[0].startswith(str(photos / "things" / "coffee.png"))


def test_missing_files_and_unknown_models_are_reported_per_file(service: ServiceProcess, photos: Path) -> None:
    missing = photos / "nowhere.jpg"
    result = run_client(str(missing), "--url", service.url, "--format", "jsonl")
    assert result.returncode == 1
    assert "cannot read the file" in json.loads(result.stdout)["error"]
    result = run_client(str(photos / "astronaut.webp"), "--url", service.url, "--model", "resnet5", "--format", "jsonl")
    row = json.loads(result.stdout)
    assert result.returncode == 1 and row["status"] == 404 and "available: " in row["error"]


def test_the_python_api_takes_paths_and_bytes(service: ServiceProcess, photos: Path) -> None:
    chelsea = photos / "animals" / "chelsea.jpg"
    results = Client(service.url).classify([chelsea, chelsea.read_bytes()], model="lenet5", top_k=3)
    assert [r.source for r in results] == [str(chelsea), "<bytes 1>"]
    assert results[0].predictions == results[1].predictions and len(results[0].predictions) == 3
    assert [p.label for p in results[0].predictions] == [
        p["label"] for p in classified(service, chelsea.read_bytes(), "lenet5")["results"][0]["predictions"][:3]
    ]


def test_nothing_listening_is_one_clear_error() -> None:
    result = run_client("README.md", "--url", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 2
    assert "cannot reach" in result.stderr and "make serve" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("localhost:3000", "is not an http:// or https:// URL: write it as http://localhost:3000"),
        ("http://localhost:3OOO", "is not a URL (Invalid port: '3OOO')"),
        ("ftp://example.org", "is not an http:// or https:// URL"),
        ("http://localhost:99999", "has port 99999: a port is from 1 to 65535"),
        ("bob:s3cret@localhost:3000", "write it as http://bob:***@localhost:3000"),
        ("http://bob:s3cret@localhost:3OOO", "--url http://bob:***@localhost:3OOO (or CNN_SERVING_URL) is not a URL"),
    ],
)
def test_a_url_that_is_not_one_is_refused_with_how_to_write_it(url: str, says: str) -> None:
    result = run_client("README.md", "--url", url)
    assert result.returncode == 2 and says in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert "s3cret" not in result.stderr  # a password in the URL is not shown
    result = run_client("README.md", env={**os.environ, "CNN_SERVING_URL": url})
    assert result.returncode == 2 and says in result.stderr


def test_expand_searches_folders_by_extension_and_keeps_files_as_given(photos: Path) -> None:
    found = expand([str(photos / "notes.txt"), str(photos / "things"), str(photos / "things" / "coffee.png")])
    assert [Path(p).name for p in found] == ["notes.txt", "coffee.png", "rocket.JPG"]


class _Stub(BaseHTTPRequestHandler):
    """Sheds load twice, then answers; wants a token when the server says so."""

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        server: Any = self.server
        if (
            self.path.startswith("/models")
            and server.token
            and self.headers.get("Authorization") != f"Bearer {server.token}"
        ):
            self._answer(401, {"error": "Missing or wrong token"})  # as the service's /models does
            return
        self._answer(200, {})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        server: Any = self.server
        if server.token and self.headers.get("Authorization") != f"Bearer {server.token}":
            self._answer(401, {"error": "Missing or wrong token"})
            return
        server.posts += 1
        server.request_ids.append(self.headers.get("X-Request-ID"))
        if server.drop > 0:  # a worker killed while it held the request: the connection ends without an answer
            server.drop -= 1
            self.close_connection = True
            return
        if server.posts <= 2 + server.dropped:
            self._answer(503, {"error": "shedding load"}, {"Retry-After": server.retry_after})
            return
        if self.path.startswith("/explain"):
            if server.explain_png:
                self._send(200, b"\x89PNG a heat map", {"Content-Type": "image/png"})
            else:
                self._answer(404, {"error": "no explanation graph here"})
            return
        self._answer(200, {"model": "stub", "version": "7",
                           "results": [{"predictions": [{"label": "ok", "index": 0, "score": 1.0}]}]})  # fmt: skip

    def _answer(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(body).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _send(self, status: int, payload: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture
def stub() -> Iterator[Any]:
    server: Any = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    server.posts, server.token, server.request_ids, server.drop, server.dropped = 0, None, [], 0, 0
    server.retry_after, server.explain_png = "0", False
    threading.Thread(target=server.serve_forever, daemon=True).start()
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield server
    server.shutdown()


def test_load_shedding_is_retried(stub: Any) -> None:
    (result,) = Client(stub.url, backoff=0.01).classify(b"image bytes")
    assert result.ok and (result.model, result.version) == ("stub", "7")
    assert stub.posts == 3


def test_a_connection_closed_without_an_answer_is_sent_again_under_the_same_request_id(stub: Any) -> None:
    stub.drop = stub.dropped = 1
    (result,) = Client(stub.url, backoff=0.01).classify(b"image bytes")
    assert result.ok and stub.posts == 4  # closed, shed, shed, answered
    (request_id,) = set(stub.request_ids)
    assert request_id and len(request_id) == 32


def test_retries_end_with_a_clear_error_once_spent(stub: Any) -> None:
    stub.drop = 10
    with pytest.raises(ServiceUnavailableError, match="cannot reach"):
        Client(stub.url, backoff=0.01, retries=2).classify(b"image bytes")
    assert stub.posts == 3


def test_many_items_come_back_in_order_through_the_bounded_window(stub: Any) -> None:
    items = [f"image {i}".encode() for i in range(30)]  # concurrency 2: a window of 8, refilled 22 times
    results = Client(stub.url, backoff=0.01).classify(items, concurrency=2)
    assert [r.source for r in results] == [f"<bytes {i}>" for i in range(30)]
    assert all(r.ok for r in results) and stub.posts == 32  # 30 answers + the 2 shed and retried


def test_a_refused_token_stops_the_run_before_the_output_is_opened(stub: Any, photos: Path, tmp_path: Path) -> None:
    stub.token = "right"
    kept = tmp_path / "labels.csv"
    kept.write_text("yesterday's results\n")
    wrong = {"PATH": "/usr/bin", "API_TOKEN": "wrong"}
    result = run_client(str(photos / "things"), "--url", stub.url, "--output", str(kept), env=wrong)
    assert result.returncode == 2 and "set API_TOKEN" in result.stderr
    assert kept.read_text() == "yesterday's results\n" and stub.posts == 0  # stopped before the first image
    result = run_client(str(photos / "things"), "--url", stub.url, env={"PATH": "/usr/bin", "API_TOKEN": "right\n"})
    assert result.returncode == 0, result.stderr


def test_retry_after_is_waited_for_in_full_and_a_longer_one_than_a_run_sits_through_is_the_answer(
    stub: Any,
) -> None:
    stub.retry_after = "1"
    started = time.perf_counter()
    (result,) = Client(stub.url, backoff=0.01).classify(b"image bytes")
    assert result.ok and stub.posts == 3 and time.perf_counter() - started >= 2.0  # two 503s asking 1 s each
    stub.posts, stub.retry_after = 0, "120"
    (result,) = Client(stub.url, backoff=0.01).classify(b"image bytes")
    assert (result.status, result.error, stub.posts) == (503, "shedding load", 1)
    soon = email.utils.format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 25 <= _retry_after(soon) <= 30 and _retry_after("") is None and _retry_after("soon") is None
    assert _retry_after("²") is None  # "²".isdigit() holds, float() refuses it


def test_an_empty_folder_or_glob_fails_the_run_and_the_output_outlives_a_service_that_is_down(
    stub: Any, tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert expand([str(empty), str(tmp_path / "nothing" / "*.png")]) == [
        str(empty),
        str(tmp_path / "nothing" / "*.png"),
    ]
    stub.posts = 2  # no shedding
    result = run_client(str(empty), str(tmp_path / "*.PNG"), "--url", stub.url, "--no-progress")
    assert result.returncode == 1 and "a folder with no image file in it" in result.stdout
    assert "No such file or directory" in result.stdout and "2 of 2 files failed" in result.stderr
    kept = tmp_path / "labels.csv"
    kept.write_text("yesterday's results\n")
    down = run_client(str(empty), "--url", f"http://127.0.0.1:{free_port()}", "--output", str(kept))
    assert down.returncode == 2 and kept.read_text() == "yesterday's results\n"


def test_an_output_that_cannot_be_written_is_named_by_its_option(stub: Any, photos: Path, tmp_path: Path) -> None:
    stub.posts = 2
    a_file = tmp_path / "afile"
    a_file.write_text("not a folder")
    result = run_client(str(photos / "things"), "--url", stub.url, "--explain", str(a_file), "--no-progress")
    assert result.returncode == 2 and f"--explain {a_file}: File exists (a folder is wanted)" in result.stderr
    result = run_client(str(photos / "things"), "--url", stub.url, "--output", str(tmp_path), "--no-progress")
    assert result.returncode == 2 and f"--output {tmp_path}: Is a directory (a file is wanted)" in result.stderr


def test_heat_maps_that_cannot_be_had_fail_the_run_and_say_why(stub: Any, photos: Path, tmp_path: Path) -> None:
    stub.posts = 2
    missing = tmp_path / "missing.png"  # fails before any heat map is asked for it
    result = run_client(str(photos / "things"), str(missing), "--url", stub.url, "--explain", str(tmp_path / "maps"),
                        "--format", "csv", "--no-progress")  # fmt: skip
    assert result.returncode == 1 and "1 of 3 files failed" in result.stderr
    assert "2 of 2 heat maps were not written" in result.stderr
    rows = list(csv.DictReader(result.stdout.splitlines()))
    assert [r["explanation"] for r in rows if "missing" not in r["path"]] == [
        "no explanation: no explanation graph here"
    ] * 2
    assert list((tmp_path / "maps").iterdir()) == []


def test_heat_maps_are_named_in_input_order_one_file_each_on_a_case_insensitive_disk(stub: Any, tmp_path: Path) -> None:
    stub.posts, stub.explain_png = 2, True
    paths = []
    for folder, name in (("a", "IMG_1.JPG"), ("b", "img_1.jpg"), ("c", "IMG_1.jpg")):
        (tmp_path / folder).mkdir()
        paths.append(tmp_path / folder / name)
        paths[-1].write_bytes(b"a photo")

    async def run() -> list[Any]:
        stream = Client(stub.url, backoff=0.01).stream(paths, concurrency=3, explain_dir=tmp_path / "maps")
        return [result async for result in stream]

    (tmp_path / "maps").mkdir()
    results = asyncio.run(run())
    assert [Path(r.explanation).name for r in results] == ["IMG_1.png", "img_1-2.png", "IMG_1-3.png"]
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == ["IMG_1-3.png", "IMG_1.png", "img_1-2.png"]


def test_the_client_needs_only_httpx_and_tqdm() -> None:
    """It installs on a laptop in seconds: nothing of the service's stack may be imported."""
    heavy = ["numpy", "PIL", "onnxruntime", "torch", "bentoml", "fastapi", "grpc", "service", "export"]
    blocker = (
        "import sys\n"
        "class Block:\n"
        f"    heavy = {heavy!r}\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in self.heavy: raise ImportError(f'{name} is not for the client')\n"
        "sys.meta_path.insert(0, Block())\n"
        "sys.argv = ['client', '--help']\n"
        "import runpy; runpy.run_module('client', run_name='__main__')\n"
    )
    result = subprocess.run([sys.executable, "-c", blocker], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--concurrency" in result.stdout
    project = tomllib.loads((ROOT / "client" / "pyproject.toml").read_text())["project"]
    assert sorted(d.split(">")[0] for d in project["dependencies"]) == ["httpx", "tqdm"]


def test_a_file_over_the_services_body_limit_fails_alone_and_the_run_goes_on(
    service: ServiceProcess, photos: Path, tmp_path: Path
) -> None:
    """Sent, it was answered 413 with the connection closed mid-upload, read as a service gone: six retries, then
    exit 2 with the files after it never sent. The limit comes from GET /models; the file is not sent."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a.png").write_bytes((photos / "things" / "coffee.png").read_bytes())
    (folder / "b.tif").write_bytes(bytes(21 * 2**20))  # over MAX_BODY_BYTES's 20 MiB
    (folder / "c.jpg").write_bytes((photos / "animals" / "chelsea.jpg").read_bytes())
    result = run_client(str(folder), "--url", service.url, "--model", "resnet18", "--format", "jsonl")
    assert result.returncode == 1 and "1 of 3 files failed" in result.stderr, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [Path(r["path"]).name for r in rows] == ["a.png", "b.tif", "c.jpg"]
    assert rows[1]["status"] == 413 and "21.0 MiB, over the service's 20.0 MiB" in rows[1]["error"]
    assert all(r["predictions"] for r in (rows[0], rows[2]))
    assert httpx.get(f"{service.url}/models", timeout=10).json()["limits"]["max_body_bytes"] == 20 * 2**20


def test_run_wide_mistakes_stop_the_run_before_anything_is_sent(
    service: ServiceProcess, photos: Path, tmp_path: Path
) -> None:
    """A heat map folder that holds the images (cat.png would be replaced by its heat map), a --top-k over the
    service's limit (every file failed alone): exit 2, the images untouched; --concurrency past 256 too."""
    image = tmp_path / "cat.png"
    image.write_bytes((photos / "things" / "coffee.png").read_bytes())
    before = image.read_bytes()
    result = run_client(str(image), "--url", service.url, "--explain", str(tmp_path))
    assert result.returncode == 2 and "holds images being classified" in result.stderr, result.stderr
    assert image.read_bytes() == before
    result = run_client(str(image), "--url", service.url, "--top-k", "5000")
    assert result.returncode == 2 and "--top-k 5000 is over the service's limit: use 1 to 1000" in result.stderr
    assert result.stdout == ""
    result = run_client(str(image), "--url", service.url, "--concurrency", "1000000")
    assert result.returncode == 2 and "--concurrency from 1 to 256" in result.stderr
    result = run_client(str(image), "", "--url", service.url)  # "$UNSET": not the current folder
    assert result.returncode == 2 and "a PATH is empty" in result.stderr


def _screen(output: str) -> list[str]:
    """The lines a terminal shows for this output: ``\\r`` returns to the line's start and overwrites it."""
    lines, line, column = [], [""] * 0, 0
    for char in re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output):
        if char == "\n":
            lines.append("".join(line).rstrip())
            line, column = [], 0
        elif char == "\r":
            column = 0
        else:
            line[column : column + 1] = [char]
            column += 1
    return [*lines, "".join(line).rstrip()]


def test_rows_and_the_progress_bar_on_one_terminal_keep_to_lines_of_their_own(stub: Any, tmp_path: Path) -> None:
    """Both streams on a terminal (a pseudo-terminal here): a row written while the bar is shown landed after the
    bar's text, on its line."""
    stub.posts = 2  # no load shed
    for i in range(12):
        (tmp_path / f"img_{i:02}.png").write_bytes(b"a photo")
    controller, terminal = os.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    child = subprocess.Popen([sys.executable, "-m", "client", str(tmp_path), "--url", stub.url, "--concurrency", "1"],
                             cwd=ROOT, stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal)  # fmt: skip
    os.close(terminal)
    shown, deadline = b"", time.monotonic() + 60
    with contextlib.suppress(OSError):  # EIO once the child has gone and the terminal is closed
        while select.select([controller], [], [], max(0.0, deadline - time.monotonic()))[0]:
            if not (chunk := os.read(controller, 65536)):
                break
            shown += chunk
    os.close(controller)
    assert child.wait(timeout=60) == 0
    screen = _screen(shown.decode())
    rows = [line for line in screen if "stub v7" in line]
    expected = [f"{tmp_path / f'img_{i:02}.png'}  stub v7  ok 100.0%" for i in range(12)]
    assert rows == expected, screen
    assert any("12/12" in line for line in screen), screen  # the bar was shown
