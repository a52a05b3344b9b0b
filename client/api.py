"""``Client(url).classify(...)``: send images to ``POST /classify``, several in flight, answers in input order.

Only httpx underneath (no numpy, Pillow, torch or ONNX Runtime): the bytes of each file
go to the service as they are, and the service decodes them.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import itertools
import os
import random
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = "http://localhost:3000"
RETRY_STATUSES = frozenset({502, 503, 504})  # load shedding, a model still loading, a balancer between replicas
# a connection refused, or closed or reset before the answer came (a worker killed or restarted): the
# request did nothing the server keeps, so it is sent again
RETRY_ERRORS = (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)
MAX_BACKOFF_S = 10.0
MAX_RETRY_AFTER_S = 60.0  # a model's cold start can ask for this long; past it, the answer is the 503


def _retry_after(value: str) -> float | None:
    """A ``Retry-After`` header's seconds: a number, or an HTTP date from now; None where absent or unreadable."""
    value = value.strip()
    if not value:
        return None
    if value.isascii() and value.isdigit():  # "²".isdigit() holds too
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, (when - dt.datetime.now(dt.UTC)).total_seconds())


class ServiceUnavailableError(RuntimeError):
    """The service cannot be reached, or refuses every request (a missing or wrong token)."""


@dataclass(frozen=True)
class Prediction:
    label: str
    index: int
    score: float


@dataclass
class Result:
    """The answer for one input: predictions, or the reason it failed."""

    source: str  # the path, or "<bytes N>" for bytes given directly
    model: str | None = None
    version: str | None = None
    predictions: list[Prediction] = field(default_factory=list)
    error: str | None = None
    status: int | None = None  # the HTTP status; None when no request was made
    explanation: str | None = None  # with explain_dir: the heat map's file, or why there is none
    explanation_failed: bool = False  # asked for, and not written (``explanation`` says why)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"path": self.source, "model": self.model, "version": self.version}
        if self.ok:
            data["predictions"] = [p.__dict__ for p in self.predictions]
            if self.explanation is not None:
                data["explanation"] = self.explanation
        else:
            data |= {"error": self.error, "status": self.status}
        return data


Item = str | Path | bytes


def _source(item: Item, position: int) -> str:
    return f"<bytes {position}>" if isinstance(item, bytes) else str(item)


def _error_message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}: {response.text[:200]}"


class Client:
    """A client of one service. ``token`` defaults to ``$API_TOKEN``."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        token: str | None = None,
        timeout: float = 120.0,
        retries: int = 6,
        backoff: float = 0.5,
    ) -> None:
        self.url = url.rstrip("/")
        token = (token if token is not None else os.environ.get("API_TOKEN", "")).strip()  # a secret file's newline
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.limits: dict[str, int] = {}  # the service's, from GET /models (check())

    def check(self, top_k: int | None = None) -> None:
        """Raise :class:`ServiceUnavailableError` where nothing answers at the URL, the service refuses the token
        (``GET /models`` asks for it as ``/classify`` does) or ``top_k`` is over its limit: a run can stop before
        it writes anything. Learns the service's ``limits``, so that a file over its body limit fails alone,
        unsent (sent, the server would answer 413 and close the connection mid-upload, which reads as a
        service gone)."""
        try:
            response = httpx.get(f"{self.url}/models", headers=self.headers, timeout=min(self.timeout, 10.0))
        except httpx.HTTPError as exc:
            raise ServiceUnavailableError(
                f"cannot reach {self.url} ({exc}); start the service with `make serve` or pass --url"
            ) from None
        self._raise_if_refused(response)
        try:
            limits = response.json()["limits"]
            self.limits = {key: int(limits[key]) for key in ("max_body_bytes", "max_top_k")}
        except (ValueError, KeyError, TypeError):  # another server at that URL, or an older service
            self.limits = {}
        if top_k is not None and top_k > self.limits.get("max_top_k", top_k):
            raise ServiceUnavailableError(f"--top-k {top_k} is over the service's limit: use 1 to "
                                          f"{self.limits['max_top_k']}")  # fmt: skip

    def _raise_if_refused(self, response: httpx.Response) -> None:
        if response.status_code in (401, 403):
            raise ServiceUnavailableError(
                f"{self.url} refused the request ({_error_message(response)}): set API_TOKEN to the service's token"
            )

    def classify(
        self,
        items: Item | Sequence[Item],
        *,
        model: str | None = None,
        top_k: int = 5,
        concurrency: int = 4,
    ) -> list[Result]:
        """Classify paths or encoded images; one :class:`Result` per item, in order.

        Inside a running event loop (a notebook, an async app), await :meth:`aclassify`.
        """
        return asyncio.run(self.aclassify(items, model=model, top_k=top_k, concurrency=concurrency))

    async def aclassify(
        self,
        items: Item | Sequence[Item],
        *,
        model: str | None = None,
        top_k: int = 5,
        concurrency: int = 4,
    ) -> list[Result]:
        """:meth:`classify` for code that already runs an event loop."""
        batch = [items] if isinstance(items, str | Path | bytes) else list(items)
        return [r async for r in self.stream(batch, model=model, top_k=top_k, concurrency=concurrency)]

    async def stream(
        self,
        items: Iterable[Item],
        *,
        model: str | None = None,
        top_k: int = 5,
        concurrency: int = 4,
        on_done: Callable[[Result], None] | None = None,
        explain_dir: Path | None = None,
    ) -> AsyncIterator[Result]:
        """Yield results in input order while up to ``concurrency`` requests are in flight.

        ``on_done`` is called as each result arrives, in any order (for a progress bar). With
        ``explain_dir``, each classified image's heat map for its top-1 class (``POST /explain``,
        the PNG overlay) is written there as ``<file stem>.png`` (``-2``, ``-3``, ... where stems repeat).
        Raises :class:`ServiceUnavailableError` when the service cannot be reached or
        refuses the token, since every other item would fail the same way.
        """
        params: dict[str, str | int] = {"top_k": top_k} | ({"model": model} if model else {})
        slots = asyncio.Semaphore(max(1, concurrency))
        # as many connections as requests in flight: httpx's default pool (100) made the rest wait in a line whose
        # wait counted against the time-out (at --concurrency 1000000, 2,680 of 3,000 files failed)
        pool = httpx.Limits(max_connections=max(1, concurrency), max_keepalive_connections=max(1, concurrency))
        async with httpx.AsyncClient(headers=self.headers, timeout=self.timeout, limits=pool) as http:
            taken: set[str] = set()  # heat maps' names, case-folded: one file each on a case-insensitive disk too

            def heat_map(position: int, item: Item) -> Path | None:
                """Where an item's heat map goes, chosen in input order (the same names run after run)."""
                if explain_dir is None:
                    return None
                stem = f"image-{position}" if isinstance(item, bytes) else Path(item).stem
                name, n = f"{stem}.png", 1
                while name.casefold() in taken:
                    n += 1
                    name = f"{stem}-{n}.png"
                taken.add(name.casefold())
                return explain_dir / name

            async def one(position: int, item: Item, target: Path | None) -> Result:
                async with slots:
                    result = await self._classify_one(http, _source(item, position), item, params)
                    if target is not None and result.ok:
                        written, result.explanation = await self._explain_one(http, item, result, target)
                        result.explanation_failed = not written
                if on_done is not None:
                    on_done(result)
                return result

            # A bounded window of tasks, so a folder of 100,000 files is not 100,000 tasks at once;
            # it runs ahead of the oldest unfinished item so one slow answer does not idle the rest.
            window: deque[asyncio.Task[Result]] = deque()
            pending = enumerate(items)

            def fill() -> None:
                for position, item in itertools.islice(pending, 4 * max(1, concurrency) - len(window)):
                    window.append(asyncio.ensure_future(one(position, item, heat_map(position, item))))

            try:
                fill()
                while window:
                    result = await window.popleft()
                    fill()
                    yield result
            finally:
                for task in window:
                    task.cancel()
                await asyncio.gather(*window, return_exceptions=True)

    async def _classify_one(
        self, http: httpx.AsyncClient, source: str, item: Item, params: dict[str, str | int]
    ) -> Result:
        if isinstance(item, bytes):
            data = item
        elif Path(item).is_dir():  # a folder given, or matched by a glob, that holds no image
            return Result(source, error="a folder with no image file in it (.jpg, .png, .webp, ...)")
        else:
            try:
                data = await asyncio.to_thread(Path(item).read_bytes)
            except OSError as exc:
                return Result(source, error=f"cannot read the file: {exc.strerror or exc}")
        most = self.limits.get("max_body_bytes")
        if most is not None and len(data) > most:
            over = f"{len(data) / 2**20:.1f} MiB, over the service's {most / 2**20:.1f} MiB a request (MAX_BODY_BYTES)"
            return Result(source, error=f"{over}: not sent", status=413)
        try:
            response = await self._post(http, data, params)
        except httpx.TimeoutException:
            return Result(source, error=f"no answer within {self.timeout:g} s")
        self._raise_if_refused(response)
        if response.status_code != 200:
            return Result(source, error=_error_message(response), status=response.status_code)
        try:
            body = response.json()
            ranked = body["results"][0]["predictions"]
            predictions = [Prediction(p["label"], int(p["index"]), float(p["score"])) for p in ranked]
            return Result(source, body["model"], body["version"], predictions, status=200)
        except (ValueError, KeyError, IndexError, TypeError):  # a proxy's page, say: not the service's answer
            return Result(source, error=f"HTTP 200 without the service's answer: {response.text[:200]!r}", status=200)

    async def _explain_one(self, http: httpx.AsyncClient, item: Item, result: Result, target: Path) -> tuple[bool, str]:
        """The top-1's heat map of an image ``result`` classified, written to ``target``: (True, its path), or
        (False, why not)."""
        try:
            data = item if isinstance(item, bytes) else await asyncio.to_thread(Path(item).read_bytes)
        except OSError as exc:
            return False, f"no explanation: cannot read the file again: {exc.strerror or exc}"
        params: dict[str, str | int] = {"model": str(result.model), "version": str(result.version),
                                        "class": result.predictions[0].index}  # fmt: skip
        try:
            response = await self._post(http, data, params, path="/explain", accept="image/png")
        except httpx.TimeoutException:
            return False, f"no explanation within {self.timeout:g} s"
        if response.status_code != 200:
            return False, f"no explanation: {_error_message(response)}"
        try:
            await asyncio.to_thread(target.write_bytes, response.content)
        except OSError as exc:
            return False, f"no explanation: cannot write {target}: {exc.strerror or exc}"
        return True, str(target)

    async def _post(
        self,
        http: httpx.AsyncClient,
        data: bytes,
        params: dict[str, str | int],
        path: str = "/classify",
        accept: str | None = None,
    ) -> httpx.Response:
        """POST with retries, each under the same ``X-Request-ID``.

        Classifying and explaining change nothing on the server, so sending again is always
        safe: 502/503/504 (shed, loading, a batch the device had no memory for, a balancer
        between replicas) and a connection refused, reset or closed before the answer (a
        worker killed or restarted) wait with bounded exponential backoff and jitter, or the
        server's ``Retry-After``, and try again.
        """
        url = f"{self.url}{path}"
        headers = {"Content-Type": "application/octet-stream", "X-Request-ID": uuid.uuid4().hex}
        headers |= {"Accept": accept} if accept else {}
        for attempt in range(self.retries + 1):
            response = None
            try:
                response = await http.post(url, content=data, params=params, headers=headers)
            except RETRY_ERRORS as exc:
                if attempt == self.retries:
                    raise ServiceUnavailableError(f"cannot reach {self.url}: {exc}. Is the service running?") from exc
            else:
                if response.status_code not in RETRY_STATUSES or attempt == self.retries:
                    return response
            delay = self._delay(attempt, response)
            if delay is None:  # the server asks for a longer wait than a run should sit through
                assert response is not None
                return response
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    def _delay(self, attempt: int, response: httpx.Response | None) -> float | None:
        """The server's ``Retry-After`` (seconds or an HTTP date) plus up to one backoff of jitter, never less than
        it asked; None where it asks for more than :data:`MAX_RETRY_AFTER_S`. Without one, exponential backoff,
        capped, times a random 0.5-1.5."""
        asked = _retry_after(response.headers.get("retry-after", "")) if response is not None else None
        if asked is None:
            return min(self.backoff * 2**attempt, MAX_BACKOFF_S) * random.uniform(0.5, 1.5)
        return asked + random.uniform(0, self.backoff) if asked <= MAX_RETRY_AFTER_S else None
