"""Three replicas behind haproxy, which health-checks /readyz as a Kubernetes Service's
endpoints do: a rolling restart under load loses no request, a crash loses at most the
requests in flight on the crashed replica, and Prometheus' sum over the replicas counts
exactly the requests sent. All replicas share this machine's 2 cores: no throughput claim.

Each phase prints its figures (``pytest -s`` shows them)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
import yaml

from service.store.layout import ModelStore

from ..helpers import (
    ROOT,
    PortTaken,
    ServiceProcess,
    bind_failed,
    encode,
    free_port,
    metric_samples,
    on_fresh_ports,
    prometheus,
    query,
    tool,
    wait_for_ok,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPLICAS = 3
CONCURRENCY = 6
CHECK_MS, FALL, RISE = 500, 2, 2
PNG = {"Content-Type": "image/png"}
DIGIT = encode(np.pad(np.full((20, 4), 255, dtype=np.uint8), 4))
HAPROXY = """\
global
    stats socket {socket} mode 600 level admin
    log stdout format raw local0 notice
defaults
    mode http
    log global
    option httplog
    option dontlog-normal  # only failed or retried requests
    timeout connect 1s
    timeout client 60s
    timeout server 60s
    # A connection refused by a replica that is stopping, or closed before it answered, is
    # tried again on another replica (the request is small enough to be kept for that).
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response
    option http-buffer-request
    # One server connection per request: a replica that closes its idle keep-alive connections
    # on SIGTERM must not take a client's connection to the balancer with it.
    option http-server-close
frontend classify
    bind 127.0.0.1:{port}
    default_backend replicas
backend replicas
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
    default-server inter {check}ms fall {fall} rise {rise}
{servers}
"""


@dataclass
class Load:
    """Closed-loop clients posting a digit to ``url`` until stopped; bounded by ``limit_s``."""

    url: str
    limit_s: float = 300.0
    results: list[tuple[float, float, int | str]] = field(default_factory=list)  # (start, end, status or error)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def _client(self) -> None:
        deadline = time.monotonic() + self.limit_s
        with httpx.Client(timeout=60, limits=httpx.Limits(max_keepalive_connections=0)) as client:
            while not self.stop.is_set() and time.monotonic() < deadline:
                started = time.monotonic()
                try:
                    response = client.post(self.url, params={"model": "lenet5"}, content=DIGIT, headers=PNG)
                    outcome: int | str = response.status_code
                except httpx.HTTPError as error:
                    outcome = f"{type(error).__name__}: {error}"
                self.results.append((started, time.monotonic(), outcome))

    def start(self, concurrency: int) -> Load:
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(concurrency)]
        for thread in self.threads:
            thread.start()
        return self

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(70)

    def between(self, start: float, end: float) -> list[tuple[float, float, int | str]]:
        return [r for r in self.results if start <= r[0] < end]


def failures(results: list[tuple[float, float, int | str]]) -> list[tuple[float, float, int | str]]:
    return [r for r in results if r[2] != 200]


class Balancer:
    def __init__(self, directory: Path, replicas: list[ServiceProcess]) -> None:
        self.port = free_port()
        self.socket = directory / "haproxy.sock"
        servers = "\n".join(f"    server r{i} 127.0.0.1:{r.port} check" for i, r in enumerate(replicas))
        config = HAPROXY.format(
            socket=self.socket, port=self.port, check=CHECK_MS, fall=FALL, rise=RISE, servers=servers
        )
        (directory / "haproxy.cfg").write_text(config)
        self.log = (directory / "haproxy.log").open("wb")
        self.socket.unlink(missing_ok=True)  # an earlier try's
        self.process = subprocess.Popen(
            [tool("haproxy"), "-db", "-f", str(directory / "haproxy.cfg")], stdout=self.log, stderr=subprocess.STDOUT
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30  # started: its frontend listens (a failed bind ends haproxy after the rest)
        while not self.listening() and self.process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.process.poll() is not None:
            self.log.close()
            if bind_failed(directory / "haproxy.log"):
                raise PortTaken(self.port)
            raise AssertionError((directory / "haproxy.log").read_text()[-2000:])

    def listening(self) -> bool:
        """Whether its frontend listens (seen from outside: a connection would be logged as a client's)."""
        try:
            connections = psutil.Process(self.process.pid).net_connections("tcp4")
        except psutil.NoSuchProcess:
            return False
        return any(c.status == psutil.CONN_LISTEN and c.laddr.port == self.port for c in connections)

    def status(self) -> dict[str, str]:
        """{server: UP, DOWN, ...} from haproxy's runtime API."""
        assert self.process.poll() is None, (self.socket.parent / "haproxy.log").read_text()
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(str(self.socket))
            except (FileNotFoundError, ConnectionRefusedError):  # still starting
                return {}
            s.sendall(b"show stat\n")
            text = b"".join(iter(lambda: s.recv(65536), b"")).decode()
        rows = [line.split(",") for line in text.splitlines() if line.startswith("replicas,r")]
        return {row[1]: row[17] for row in rows}

    def wait_for(self, server: str, state: str, timeout: float = 60) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.status().get(server, "").startswith(state):
                return time.monotonic() - started
            time.sleep(0.05)
        raise AssertionError(f"{server} not {state} after {timeout}s: {self.status()}")

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        self.log.close()


@pytest.fixture
def cluster(model_store: ModelStore, tmp_path: Path) -> Iterator[tuple[list[ServiceProcess], Balancer]]:
    replicas: list[ServiceProcess] = []
    balancer = None
    try:
        for i in range(REPLICAS):
            replicas.append(replica(model_store, tmp_path, f"r{i}-0"))
        balancer = on_fresh_ports(lambda: Balancer(tmp_path, replicas))
        for i in range(REPLICAS):
            balancer.wait_for(f"r{i}", "UP")
        yield replicas, balancer
    finally:
        if balancer:
            balancer.close()
        for r in replicas:
            r.stop()


def replica(model_store: ModelStore, directory: Path, name: str, port: int | None = None) -> ServiceProcess:
    process = ServiceProcess(Path(model_store.root), directory / f"{name}.log", MODELS="lenet5")
    return (process.on_port(port) if port else process).start()


def sigterm(process: ServiceProcess) -> int:
    """What the kubelet does: SIGTERM to the container's first process, then wait for it to exit."""
    assert process.process is not None
    os.kill(process.process.pid, signal.SIGTERM)
    return process.process.wait(60)


def test_rolling_restart_crash_and_metrics_across_three_replicas(
    cluster: tuple[list[ServiceProcess], Balancer], model_store: ModelStore, tmp_path: Path
) -> None:
    replicas, balancer = cluster
    scrape = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "components" / "keda" / "scaledobject.yaml").read_text())
    keda_query = scrape["spec"]["triggers"][0]["metadata"]["query"]
    config = {
        "global": {"scrape_interval": "1s"},
        "scrape_configs": [
            {"job_name": "cnn-serving", "static_configs": [{"targets": [f"127.0.0.1:{r.port}" for r in replicas]}]}
        ],
    }
    (tmp_path / "prometheus").mkdir()
    with prometheus(tmp_path / "prometheus", config) as prometheus_url:
        time.sleep(3)  # a few scrapes of idle replicas: the autoscaling signal's "before"
        idle_at = time.time()
        load = Load(f"{balancer.url}/classify").start(CONCURRENCY)
        try:
            time.sleep(3)

            # 1. rolling restart: SIGTERM one replica at a time; the replacement takes traffic once ready
            rolling_start = time.monotonic()
            served_during: list[int] = []  # requests started while each replica was being replaced
            for i in range(REPLICAS):
                replaced_at = time.monotonic()
                assert sigterm(replicas[i]) == 0
                replicas[i] = replica(model_store, tmp_path, f"r{i}-1", port=replicas[i].port)
                balancer.wait_for(f"r{i}", "UP")
                served_during.append(len(load.between(replaced_at, time.monotonic())))
            rolling = load.between(rolling_start, time.monotonic())
            print(f"\nrolling restart: {len(rolling)} requests in {time.monotonic() - rolling_start:.1f} s "
                  f"({served_during} while each replica was replaced), {len(failures(rolling))} failed")  # fmt: skip
            # the load ran through every replacement (how many requests depends on the machine's speed)
            assert all(served_during) and failures(rolling) == []

            # 2. a crash: SIGKILL every process of one replica; the balancer must notice within its checks
            time.sleep(2)
            crashed = replicas[0]
            assert crashed.process is not None
            tree = psutil.Process(crashed.process.pid)
            processes = [tree, *tree.children(recursive=True)]  # a container's death takes all of them
            killed_at = time.monotonic()
            for process in processes:
                process.kill()
            detected_s = balancer.wait_for("r0", "DOWN")
            time.sleep(2)
            crash = load.between(killed_at, time.monotonic())
            print(f"crash: marked DOWN after {detected_s:.2f} s (check every {CHECK_MS} ms, fall {FALL}); "
                  f"{len(crash)} requests, {len(failures(crash))} failed: {failures(crash)[:5]}")  # fmt: skip
            # haproxy's contract: FALL failed checks, one every CHECK_MS; the slack is for a busy machine's scheduling
            assert detected_s <= (CHECK_MS * (FALL + 1)) / 1000 + 3.0
            assert len(failures(crash)) <= CONCURRENCY  # at most the requests in flight on it
            after = load.between(killed_at + detected_s + 0.5, time.monotonic())
            assert after and failures(after) == []
            crashed.process.wait(10)
            replicas[0] = replica(model_store, tmp_path, "r0-2", port=crashed.port)
            balancer.wait_for("r0", "UP")
            time.sleep(5)  # load on all three again, for the autoscaling signal below

            # The autoscaling signal (KEDA's query, verbatim), a measured figure: how much of a round trip
            # the service itself holds depends on the machine (for LeNet-5 most of it is the client, the
            # balancer and HTTP). What must hold: it exists, it rose from nothing with the load, and the
            # service cannot hold requests longer than the clients waited for them (the slack is for
            # Prometheus' extrapolation of rate() at the edges of its window and of restarted series).
            window = load.between(time.monotonic() - 60, time.monotonic() - 1)
            client_in_flight = sum(end - start for start, end, _ in window) / 59
            idle = query(prometheus_url, keda_query, at=idle_at)
            (sample,) = query(prometheus_url, keda_query)
            server_in_flight = float(sample["value"][1])
            print(f"autoscaling signal `{keda_query}`: {server_in_flight:.2f} requests in flight over all "
                  f"replicas under load ({[s['value'][1] for s in idle]} before it); the clients had "
                  f"{client_in_flight:.2f} (of {CONCURRENCY})")  # fmt: skip
            assert all(float(s["value"][1]) == 0 for s in idle)
            assert 0 < server_in_flight <= client_in_flight * 1.10
        finally:
            load.finish()
        assert wait_for_ok(f"{balancer.url}/readyz", 10)

        # 3. metrics across replicas: Prometheus' sum over the three counts every request sent
        def total() -> float:
            return sum(float(s["value"][1]) for s in query(prometheus_url, "cnn_requests_total"))

        def counted() -> float:  # what the replicas count now, read from each
            return sum(value for r in replicas
                       for _, value in metric_samples(httpx.get(f"{r.url}/metrics", timeout=10).text,
                                                      "cnn_requests_total"))  # fmt: skip

        # the load's last requests scraped: Prometheus' sum is the replicas' own before the count below begins
        wait_until(lambda: total() == counted(), 30, "Prometheus' sum equal to the replicas' own counts")
        before = total()
        sent = 120
        with httpx.Client(timeout=30) as client:
            statuses = [
                client.post(f"{balancer.url}/classify?model=lenet5", content=DIGIT, headers=PNG).status_code
                for _ in range(sent)
            ]
        assert statuses == [200] * sent
        deadline = time.monotonic() + 20
        while total() != before + sent and time.monotonic() < deadline:
            time.sleep(0.5)
        per_replica = {
            s["metric"]["instance"]: float(s["value"][1])
            for s in query(prometheus_url, "sum by (instance) (cnn_requests_total)")
        }
        print(f"metrics: {sent} requests sent; Prometheus' sum of cnn_requests_total rose by {total() - before:.0f} "
              f"(per replica now {per_replica})")  # fmt: skip
        assert total() == before + sent
        assert len(per_replica) == REPLICAS
