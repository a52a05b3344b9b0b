"""Files that readers in other processes find whole: the store's labels and configuration as an export
publishes them, and the state files the workers share (declared models, canaries, readiness)."""

from __future__ import annotations

import os
import threading
from pathlib import Path


def replace_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically: a reader sees the old file or the new one, never part of either.

    Staged beside it (one filesystem, so ``os.replace`` is a rename) under a name of this process and thread,
    so that two writers never share a staging file; a staging file whose write failed (a full disk) is removed.
    """
    staging = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        staging.write_text(text, encoding="utf-8")
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
