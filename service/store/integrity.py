"""Is a version in the store complete? Its graph must hash to the ``onnx.sha256`` its metadata records.

A person copying a version into the store (``cp -r``) leaves it half-written for a while:
the metadata may be missing or the graph short. Such a version is *incomplete* and looked
at again later; only once its files have stayed the same for ``settle`` seconds is a
mismatch taken as real (*corrupt*). Hashes are cached by the files' size and mtime, so
re-checking an unchanged store costs a ``stat`` per file.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .layout import StoredVersion

Signature = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Verdict:
    state: Literal["complete", "incomplete", "corrupt"]
    reason: str = ""
    signature: Signature = ()


def file_signature(*paths: Path) -> Signature:
    """(size, mtime) of each file; (-1, -1) for one that is absent."""
    signature = []
    for path in paths:
        try:
            stat = path.stat()
            signature.append((stat.st_size, stat.st_mtime_ns))
        except OSError:
            signature.append((-1, -1))
    return tuple(signature)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class IntegrityChecker:
    def __init__(self, settle: float) -> None:
        self.settle = settle
        self._digests: dict[tuple[Path, Signature], str] = {}
        self._first_seen: dict[tuple[Path, Signature], float] = {}

    def signature(self, stored: StoredVersion) -> Signature:
        return file_signature(stored.graph, stored.metadata_path)

    def check(self, stored: StoredVersion) -> Verdict:
        signature = self.signature(stored)
        problem = self._problem(stored, signature)
        if problem is None:
            return Verdict("complete", signature=signature)
        first_seen = self._first_seen.setdefault((stored.directory, signature), time.monotonic())
        if time.monotonic() - first_seen < self.settle:
            return Verdict("incomplete", f"{problem} (a copy in progress? looked at again at the next poll)", signature)
        return Verdict("corrupt", problem, signature)

    def _problem(self, stored: StoredVersion, signature: Signature) -> str | None:
        if signature[1][0] < 0:
            return f"{stored.metadata_path.name} is missing"
        if signature[0][0] < 0:
            return f"{stored.graph.name} is missing"
        try:
            expected = stored.read_metadata()["onnx"]["sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            return f"{stored.metadata_path.name} is invalid: not JSON with onnx.sha256"
        key = (stored.graph, signature)
        if key not in self._digests:
            self._digests[key] = _sha256(stored.graph)
        if self._digests[key] != expected:
            return f"{stored.graph.name}'s sha256 does not match {stored.metadata_path.name} (truncated or replaced?)"
        return None
