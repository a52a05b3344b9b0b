"""Steady HTTP and gRPC load on one model, recording every answer: the lifecycle tests' witness."""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass

import httpx
import numpy as np
import psutil
import tritonclient.grpc as triton_grpc

from ..helpers import ServiceProcess, encode

DIGIT = encode(np.full((28, 28), 255, dtype=np.uint8))


@dataclass
class Answer:
    at: float  # monotonic, when the request was sent
    seconds: float
    protocol: str
    version: str | None
    error: str | None = None


class SteadyLoad:
    """``concurrency`` clients (half HTTP ``/classify``, half gRPC ``ModelInfer``) sending back to back."""

    def __init__(self, service: ServiceProcess, model: str = "lenet5", concurrency: int = 8) -> None:
        self.service, self.model, self.concurrency = service, model, concurrency
        self.answers: list[Answer] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._http if i % 2 == 0 else self._grpc, daemon=True) for i in range(concurrency)
        ]

    def __enter__(self) -> SteadyLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def _record(self, started: float, protocol: str, version: str | None, error: str | None = None) -> None:
        self.answers.append(Answer(started, time.monotonic() - started, protocol, version, error))

    def _http(self) -> None:
        with httpx.Client(base_url=self.service.url, timeout=30) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    response = client.post("/classify", params={"model": self.model}, content=DIGIT,
                                           headers={"content-type": "image/png"})  # fmt: skip
                except httpx.HTTPError as exc:
                    self._record(started, "http", None, repr(exc))
                    continue
                if response.status_code == 200:
                    self._record(started, "http", response.json()["version"])
                else:
                    self._record(started, "http", None, f"{response.status_code} {response.text}")

    def _grpc(self) -> None:
        client = triton_grpc.InferenceServerClient(self.service.grpc_target)
        files = triton_grpc.InferInput("image_bytes", [1], "BYTES")
        files.set_data_from_numpy(np.array([DIGIT], dtype=object))
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                result = client.infer(self.model, [files])
            except Exception as exc:  # InferenceServerException and transport errors alike are failures here
                self._record(started, "grpc", None, repr(exc))
                continue
            self._record(started, "grpc", result.get_response().model_version)
        client.close()

    def first(self, version: str) -> float | None:
        """When the first request answered by ``version`` was sent."""
        return min((a.at for a in list(self.answers) if a.version == version), default=None)


def percentiles(answers: list[Answer]) -> str:
    if not answers:
        return "no requests"
    milliseconds = np.array([a.seconds for a in answers]) * 1000
    p50, p99 = np.percentile(milliseconds, [50, 99])
    return f"{len(answers)} requests, p50 {p50:.1f} ms, p99 {p99:.1f} ms"


def worker_rss(service: ServiceProcess) -> int:
    """Resident bytes of the server's worker process (the one that holds the models)."""
    assert service.process is not None
    children = psutil.Process(service.process.pid).children(recursive=True)
    workers = [p for p in children if "_bentoml_impl.worker" in " ".join(p.cmdline())]
    return sum(p.memory_info().rss for p in workers)


class Workload:
    """``concurrency`` clients, half HTTP and half gRPC, asking for models by ``popularity`` (weights), recording
    every answer (model, protocol, status, seconds, top-3 scores, error) and the worker's resident memory."""

    def __init__(self, service: ServiceProcess, popularity: dict[str, float], photo: bytes, seconds: float,
                 concurrency: int = 8) -> None:  # fmt: skip
        self.service, self.popularity, self.photo = service, popularity, photo
        self.seconds, self.concurrency = seconds, concurrency
        self.answers: list[tuple[str, str, int, float, list[float] | None, str | None]] = []
        self.rss: list[int] = []

    def run(self) -> None:
        stop = threading.Event()
        threads = [threading.Thread(target=self._client, args=(i, stop), daemon=True) for i in range(self.concurrency)]
        for thread in threads:
            thread.start()
        try:
            deadline = time.monotonic() + self.seconds
            while time.monotonic() < deadline:
                self.rss.append(worker_rss(self.service))
                time.sleep(0.2)
        finally:  # a failure here leaves no client loading the next test's server
            stop.set()
            for thread in threads:
                thread.join(120)

    def _client(self, index: int, stop: threading.Event) -> None:
        chooser = random.Random(index)
        names, weights = list(self.popularity), list(self.popularity.values())
        grpc = triton_grpc.InferenceServerClient(self.service.grpc_target) if index % 2 else None
        with httpx.Client(base_url=self.service.url, timeout=120) as http:
            while not stop.is_set():
                name = chooser.choices(names, weights)[0]
                started = time.monotonic()
                try:
                    scores = self._grpc(grpc, name) if grpc is not None else self._http(http, name)
                    self.answers.append((name, "grpc" if grpc else "http", 200, time.monotonic() - started, scores,
                                         None))  # fmt: skip
                except Exception as exc:  # every failure is recorded, none raised in the thread
                    self.answers.append((name, "grpc" if grpc else "http", 0, time.monotonic() - started, None,
                                         repr(exc)[:300]))  # fmt: skip

    def _http(self, http: httpx.Client, name: str) -> list[float]:
        response = http.post("/classify", params={"model": name, "top_k": 3}, content=self.photo,
                             headers={"content-type": "image/jpeg"})  # fmt: skip
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code} {response.text[:200]}")
        return [p["score"] for p in response.json()["results"][0]["predictions"]]

    def _grpc(self, client: triton_grpc.InferenceServerClient, name: str) -> list[float]:
        tensor = triton_grpc.InferInput("image_bytes", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([self.photo], dtype=object))
        probabilities = client.infer(name, [tensor], outputs=[triton_grpc.InferRequestedOutput("probabilities")])
        return sorted(probabilities.as_numpy("probabilities")[0].tolist(), reverse=True)[:3]
