"""How many CPUs this process may use: its CPU affinity, and its cgroup's CPU quota.

Kubernetes CPU limits are cgroup quotas (``cpu.max`` in cgroup v2,
``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` in v1), invisible to ``os.cpu_count()`` and
to the affinity mask: a pod limited to 2 CPUs on a 64-core node would otherwise start 64
ONNX Runtime threads per session and be throttled to a crawl. A fractional quota rounds
down (at least 1), as Go's automaxprocs does: 1.5 CPUs give one thread that is never
throttled rather than two that are, a quarter of the time.
"""

from __future__ import annotations

import math
import os
from functools import cache
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def read_setting(path: Path) -> str | None:
    """A cgroup file's content, stripped; None where it cannot be read."""
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _ancestors(mount: Path, relative: str) -> list[Path]:
    """The process's cgroup folder and its parents up to the mount (a container sees its own as root)."""
    start = mount / relative.lstrip("/")
    if not start.is_dir():
        return [mount]
    return [start, *[p for p in start.parents if p.is_relative_to(mount)]]


def _ratio(quota: str, period: str) -> float | None:
    try:
        value = int(quota) / int(period)
    except (ValueError, ZeroDivisionError):  # an unreadable file is no limit, not a crash at start-up
        return None
    return value if value > 0 else None  # v1 writes -1 for no quota


def _v2_limit(directory: Path) -> float | None:
    text = read_setting(directory / "cpu.max")  # "max 100000" or "<quota> <period>"
    if text is None or text.startswith("max"):
        return None
    quota, _, period = text.partition(" ")
    return _ratio(quota, period or "100000")


def _v1_limit(directory: Path) -> float | None:
    quota, period = read_setting(directory / "cpu.cfs_quota_us"), read_setting(directory / "cpu.cfs_period_us")
    return None if quota is None or period is None else _ratio(quota, period)


def cgroup_folders(controller: str, v2_marker: str, root: Path, proc_cgroup: Path) -> list[tuple[int, Path]]:
    """The process's cgroup folders for ``controller`` and their parents up to the mount, each with its cgroup
    version: v2 where ``root`` holds ``v2_marker`` (mounted at the root), else v1's ``root/<controller>`` (or the
    joint mount that names it, such as ``cpu,cpuacct``)."""
    folders: list[tuple[int, Path]] = []
    for line in (read_setting(proc_cgroup) or "").splitlines():
        hierarchy, controllers, relative = line.split(":", 2)
        if hierarchy == "0" and (root / v2_marker).exists():
            folders += [(2, folder) for folder in _ancestors(root, relative)]
        elif controller in controllers.split(","):
            mount = next((root / name for name in (controllers, controller) if (root / name).is_dir()), None)
            if mount is not None:
                folders += [(1, folder) for folder in _ancestors(mount, relative)]
    return folders


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """CPUs the cgroup quota allows (the tightest on the way up), or None without a quota."""
    limits = [(_v2_limit if version == 2 else _v1_limit)(folder)
              for version, folder in cgroup_folders("cpu", "cpu.max", root, proc_cgroup)]  # fmt: skip
    return min(filter(None, limits), default=None)


@cache
def cpu_count() -> int:
    """CPUs this process may run on: min(affinity, cgroup quota rounded down), at least 1.

    Read once: the settings ask on every model load, and a process's limit is fixed by
    the container it starts in.
    """
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        affinity = os.cpu_count() or 1
    quota = cgroup_cpu_limit()
    allowed = affinity if quota is None else min(affinity, math.floor(quota))
    return max(1, allowed)
