"""Fetching a published file: a time limit on every wait, a few tries, and the whole body or an error.

``torch.hub.download_url_to_file`` and ``urllib.request.urlretrieve`` wait without end on a connection that
opens and never answers (a proxy or firewall that drops the traffic), and a body cut short is only seen when its
hash is checked, as if the file were tampered with. Here a connection to each of the host's addresses, and each
read, waits at most ``timeout`` seconds; a body that brings under 64 KiB in that long, or ends short of its
``Content-Length``, fails; each is tried again (``attempts`` in all, waiting 2 s, then 4 s), as is a server's
5xx or 429; a host every try of which timed out is not waited on again by this process. A name that does not
resolve, a refused connection, another 4xx and a missing file are not tried again: that is the machine being
offline, or the URL being wrong, and trying again would only delay the message.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

TIMEOUT_S = 30.0
ATTEMPTS = 3
FIRST_BACKOFF_S = 2.0
CHUNK = 1 << 20
MIN_BYTES_PER_WINDOW = 64 * 1024  # in each time-out's span, or the body is given up on as stuck


# Hosts every try of a download from timed out, in this process: `python -m export default` behind a firewall
# that drops the traffic waits out one network's tries, not each network's
_silent: set[str] = set()


class IncompleteDownload(OSError):
    """The connection closed before the body's ``Content-Length`` had arrived."""


def download(url: str, target: Path, *, progress: bool = True, timeout: float | None = None,
             attempts: int | None = None) -> str:  # fmt: skip
    """``url``'s body written to ``target`` (replaced on each try), and its sha256; raises the last ``OSError``
    (``urllib.error.URLError``, ``TimeoutError``, :class:`IncompleteDownload`) or ``http.client.HTTPException``
    once the tries are spent or the failure is not one a new try can mend. ``timeout`` and ``attempts``:
    :data:`TIMEOUT_S` and :data:`ATTEMPTS` unless given."""
    timeout = TIMEOUT_S if timeout is None else timeout
    attempts = ATTEMPTS if attempts is None else attempts
    host = urllib.parse.urlsplit(url).netloc
    if host in _silent:  # every try of an earlier download from it timed out: do not wait that long again
        raise TimeoutError(f"{host} did not answer an earlier download in time, any of its tries")
    timeouts = 0
    for attempt in range(1, attempts + 1):
        try:
            return _fetch(url, target, progress, timeout)
        except (OSError, http.client.HTTPException) as exc:
            timeouts += _timed_out(exc)
            if timeouts == attempts:
                _silent.add(host)
            if attempt == attempts or not _worth_again(exc):
                raise
            wait = FIRST_BACKOFF_S * 2 ** (attempt - 1)
            logger.warning("%s: %s: %s; trying again in %.0f s (%d of %d)", url, type(exc).__name__, exc, wait,
                           attempt + 1, attempts)  # fmt: skip
            time.sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises


def _fetch(url: str, target: Path, progress: bool, timeout: float) -> str:
    digest, received = hashlib.sha256(), 0
    with urllib.request.urlopen(url, timeout=timeout) as response, target.open("wb") as out:
        expected = response.headers.get("Content-Length")
        total = int(expected) if expected and expected.isdigit() else None
        window, window_bytes = time.monotonic(), 0  # a body that trickles is as stuck as one that stops
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=target.name.split(".")[0],
                  disable=not progress) as bar:  # fmt: skip
            while chunk := response.read1(CHUNK):  # what has arrived, one wait at most: the time-out holds
                digest.update(chunk)
                out.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
                window_bytes += len(chunk)
                if time.monotonic() - window > timeout:
                    if window_bytes < MIN_BYTES_PER_WINDOW:
                        raise TimeoutError(f"under {MIN_BYTES_PER_WINDOW // 1024} KiB in {timeout:.0f} s")
                    window, window_bytes = time.monotonic(), 0
    if total is not None and received < total:
        raise IncompleteDownload(f"the connection closed after {received} of {total} bytes")
    return digest.hexdigest()


def _worth_again(exc: BaseException) -> bool:
    """Whether a new try may succeed: a time-out, a reset, a cut-off body, a server error; not a name that does
    not resolve or a refused connection (offline, or no proxy there), a 4xx, a missing file or a disk's error."""
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code >= 500 or exc.code == 429
    exc = _reason(exc)
    if isinstance(exc, ConnectionRefusedError):
        return False
    return isinstance(exc, TimeoutError | ConnectionError | IncompleteDownload | http.client.HTTPException)


def _timed_out(exc: BaseException) -> bool:
    return isinstance(_reason(exc), TimeoutError)


def _reason(exc: BaseException) -> BaseException:
    """What a ``URLError`` wraps (a time-out, a refused connection), else ``exc``."""
    if isinstance(exc, urllib.error.URLError) and isinstance(exc.reason, BaseException):
        return exc.reason
    return exc
