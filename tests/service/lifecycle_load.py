"""Steady HTTP and gRPC load on one model, recording every answer: the lifecycle tests' witness."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import httpx
import numpy as np
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
