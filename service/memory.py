"""How much memory the models may take: ``MEMORY_BUDGET``, or what the cgroup (the pod's limit) leaves.

Kubernetes memory limits are cgroup limits (``memory.max`` in cgroup v2, ``memory.limit_in_bytes``
in v1), invisible to ``free`` and to ``/proc/meminfo``: a pod limited to 4 GiB on a 256 GiB node
that sized itself by the node would be killed at its first large load. The default budget is the
tightest limit on the way up the process's cgroups, else the machine's memory, less a headroom
(``HEADROOM``) and the server's own baseline (what its processes hold with no model loaded).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import psutil

from .store.host import CGROUP_ROOT, PROC_CGROUP, cgroup_folders, read_setting

HEADROOM = 0.10  # of the limit: request buffers, decoding, the allocator's slack
NO_LIMIT = 1 << 60  # v1 writes about 2**63 for "no limit"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4,
          "ki": 1024, "mi": 1024**2, "gi": 1024**3, "ti": 1024**4}  # fmt: skip


def parse_size(text: str) -> int:
    """``"4GiB"``, ``"512MiB"``, ``"1.5G"``, ``"1000000"`` -> bytes; ValueError with the accepted forms."""
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a size: use bytes or a number with KiB, MiB, GiB (or K, M, G), e.g. 4GiB")
    unit = (match.group(2) or "").lower().removesuffix("b")
    return int(float(match.group(1)) * _UNITS[unit])


def _limit(text: str | None) -> int | None:
    if text is None or text == "max":
        return None
    try:
        value = int(text)
    except ValueError:  # unreadable: no limit, not a crash at start-up
        return None
    return value if 0 < value < NO_LIMIT else None


def cgroup_memory_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int | None:
    """Bytes the cgroup limit allows (the tightest on the way up), or None without a limit."""
    files = {2: "memory.max", 1: "memory.limit_in_bytes"}
    limits = [_limit(read_setting(folder / files[version]))
              for version, folder in cgroup_folders("memory", "cgroup.controllers", root, proc_cgroup)]  # fmt: skip
    return min(filter(None, limits), default=None)


def resident_bytes(pid: int | None = None) -> int:
    """A process's resident set size (this one's by default)."""
    return int(psutil.Process(pid or os.getpid()).memory_info().rss)


def default_budget(baseline: int, workers: int) -> tuple[int, str]:
    """The whole server's budget for models, and how it was derived: the limit less the headroom and every
    worker's baseline."""
    limit = cgroup_memory_limit()
    source = "the cgroup memory limit"
    if limit is None:
        limit, source = int(psutil.virtual_memory().total), "the machine's memory (no cgroup limit)"
    budget = int(limit * (1 - HEADROOM)) - baseline * workers
    how = (f"{source} {limit / 2**20:.0f} MiB, less {HEADROOM:.0%} headroom and {workers} worker(s)' baseline of "
           f"{baseline / 2**20:.0f} MiB each")  # fmt: skip
    return max(budget, 0), how
