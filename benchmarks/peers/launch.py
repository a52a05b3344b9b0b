"""Start a peer from ``benchmarks/.peers-venv`` on loopback, and speak its request format.

Runs in the benchmark's own interpreter; the peer runs in the peers' virtual environment
(``make peers`` builds it) with the project root on ``PYTHONPATH``.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests import helpers

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / "benchmarks" / ".peers-venv"
MLSERVER_MAX_BATCH_SIZE = 32
MLSERVER_MAX_BATCH_TIME_S = 0.002  # the service's MAX_BATCH_DELAY_MS, 2 ms


class PeerUnavailable(RuntimeError):
    """The peers' virtual environment is missing or a peer did not start."""


class PortTaken(PeerUnavailable, helpers.PortTaken):
    """A port picked free was bound by another socket before the peer could bind it."""


@dataclass
class Peer:
    name: str
    base: str  # http://127.0.0.1:PORT
    path: str  # the inference endpoint
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"{self.base}{self.path}"

    def body(self, image: bytes) -> bytes:
        encoded = base64.b64encode(image).decode()
        if self.name == "mlserver":
            tensor = {"name": "image", "shape": [1], "datatype": "BYTES", "data": [encoded],
                      "parameters": {"content_type": "base64"}}  # fmt: skip
            return json.dumps({"inputs": [tensor]}).encode()
        return json.dumps({"image": encoded}).encode()

    def answer(self, response: dict[str, Any]) -> list[dict[str, Any]]:
        """The top 5 ``[{"index", "score"}]`` from this peer's response."""
        if self.name == "mlserver":
            top: list[dict[str, Any]] = json.loads(response["outputs"][0]["data"][0])
            return top
        predictions: list[dict[str, Any]] = response["predictions"]
        return predictions

    def stop(self) -> None:
        """Every process of the peer's group, not only its first: see ``tests.helpers.stop_group``."""
        helpers.stop_group(self.process)


def _spawn(command: list[str], log: Path, cwd: Path = ROOT) -> subprocess.Popen[bytes]:
    if not (VENV / "bin" / "python").exists():
        raise PeerUnavailable(f"{VENV} is missing: `make peers` builds it (benchmarks/peers/requirements.txt)")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{VENV / 'bin'}:{os.environ['PATH']}"}
    with log.open("wb") as out:
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip


def _wait(peer: Peer, ready_url: str, timeout: float = 180) -> Peer:
    # MLServer whose metrics port is taken logs the bind error and hangs rather than exit
    unbound = functools.partial(helpers.bind_failed, peer.log)
    if helpers.wait_for_ok(ready_url, timeout, give_up=lambda: peer.process.poll() is not None or unbound()):
        return peer
    peer.stop()
    text = peer.log.read_text(errors="replace")
    # uvicorn's bind failure is one ERROR line far above the traceback of the shutdown it causes
    errors = "\n".join(line for line in text.splitlines() if "ERROR" in line or "Errno" in line)
    raise (PortTaken if unbound() else PeerUnavailable)(
        f"{peer.name} did not start: {errors[-1000:]}\n...\n{text[-1500:]}"
    )


def start_mlserver(version_dir: Path, ports: tuple[int, ...], workdir: Path) -> Peer:
    """MLServer with a custom runtime, adaptive batching on, one inference worker."""
    http, grpc, metrics = ports
    repository = workdir / "mlserver"
    (repository / "cnn").mkdir(parents=True, exist_ok=True)
    # metrics_dir: MLServer's default is .metrics in the working directory, the project's root
    settings = {"http_port": http, "grpc_port": grpc, "metrics_port": metrics, "host": "127.0.0.1",
                "parallel_workers": 1, "debug": False, "metrics_dir": str(repository / ".metrics")}  # fmt: skip
    model = {"name": "cnn", "implementation": "benchmarks.peers.mlserver_runtime.CNNRuntime",
             "max_batch_size": MLSERVER_MAX_BATCH_SIZE, "max_batch_time": MLSERVER_MAX_BATCH_TIME_S,
             "parameters": {"uri": str(version_dir)}}  # fmt: skip
    (repository / "settings.json").write_text(json.dumps(settings))
    (repository / "cnn" / "model-settings.json").write_text(json.dumps(model))
    log = workdir / "mlserver.log"
    process = _spawn([str(VENV / "bin" / "mlserver"), "start", str(repository)], log)
    base = f"http://127.0.0.1:{http}"
    return _wait(Peer("mlserver", base, "/v2/models/cnn/infer", process, log), f"{base}/v2/models/cnn/ready")


def start_litserve(version_dir: Path, port: int, workdir: Path) -> Peer:
    """LitServe with its batching on, one worker."""
    log = workdir / "litserve.log"
    command = [str(VENV / "bin" / "python"), "-m", "benchmarks.peers.litserve_server", str(version_dir), str(port)]
    process = _spawn(command, log)
    base = f"http://127.0.0.1:{port}"
    return _wait(Peer("litserve", base, "/predict", process, log), f"{base}/health")
