"""CPU counting honours the cgroup quota (Kubernetes CPU limits), in fake files and in a real cgroup."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from service.store.host import cgroup_cpu_limit

from ...helpers import ROOT, in_child_cgroup


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def _v2(tmp_path: Path, cpu_max: str, relative: str = "/kubepods/pod1/ctr") -> float | None:
    root = tmp_path / "cgroup"
    _write(root / "cpu.max", "max 100000")  # the root: no limit
    _write(root / relative.lstrip("/") / "cpu.max", cpu_max)
    _write(tmp_path / "self", f"0::{relative}")
    return cgroup_cpu_limit(root, tmp_path / "self")


def test_v2_quota(tmp_path: Path) -> None:
    assert _v2(tmp_path, "200000 100000") == 2.0


def test_v2_max_is_no_limit(tmp_path: Path) -> None:
    assert _v2(tmp_path, "max 100000") is None


def test_v2_fractional_quota(tmp_path: Path) -> None:
    assert _v2(tmp_path, "150000 100000") == 1.5


def test_v2_the_tightest_ancestor_wins(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    _write(root / "cpu.max", "max 100000")
    _write(root / "pod" / "cpu.max", "100000 100000")  # the pod: 1 CPU
    _write(root / "pod" / "ctr" / "cpu.max", "400000 100000")  # the container: 4
    _write(tmp_path / "self", "0::/pod/ctr")
    assert cgroup_cpu_limit(root, tmp_path / "self") == 1.0


def test_v2_inside_a_container_namespace_reads_its_own_root(tmp_path: Path) -> None:
    """With a cgroup namespace the path is '/', and the mount is the container's cgroup."""
    root = tmp_path / "cgroup"
    _write(root / "cpu.max", "250000 100000")
    _write(tmp_path / "self", "0::/")
    assert cgroup_cpu_limit(root, tmp_path / "self") == 2.5


def _v1(tmp_path: Path, quota: str, period: str = "100000", controllers: str = "cpu,cpuacct") -> float | None:
    root = tmp_path / "cgroup"
    _write(root / controllers / "cpu.cfs_quota_us", "-1")
    _write(root / controllers / "cpu.cfs_period_us", "100000")
    container = root / controllers / "docker" / "abc"
    _write(container / "cpu.cfs_quota_us", quota)
    _write(container / "cpu.cfs_period_us", period)
    _write(tmp_path / "self", f"5:memory:/docker/abc\n4:{controllers}:/docker/abc\n0::/docker/abc")
    return cgroup_cpu_limit(root, tmp_path / "self")


def test_v1_quota(tmp_path: Path) -> None:
    assert _v1(tmp_path, "300000") == 3.0


def test_v1_no_quota(tmp_path: Path) -> None:
    assert _v1(tmp_path, "-1") is None


def test_v1_fractional_quota_and_another_period(tmp_path: Path) -> None:
    assert _v1(tmp_path, "75000", "50000", controllers="cpu") == 1.5


def test_no_cgroup_files_is_no_limit(tmp_path: Path) -> None:
    assert cgroup_cpu_limit(tmp_path / "absent", tmp_path / "absent-self") is None


def test_garbage_is_no_limit_not_a_crash(tmp_path: Path) -> None:
    assert _v2(tmp_path, "lots 0") is None


THREADS = "from service.settings import Settings; s = Settings(); print(s.session_threads(), s.decoder_threads)"


def test_a_real_cgroup_quota_sets_the_thread_defaults() -> None:
    """A child cgroup with a 1-CPU quota: a service started in it uses 1 ONNX Runtime thread, not nproc."""
    inside = in_child_cgroup("cpu", {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "150000"}, THREADS)  # 1.5 CPUs
    assert inside.returncode == 0, inside.stderr
    assert inside.stdout.split() == ["1", "1"]


def test_without_a_quota_the_thread_defaults_follow_the_cpus() -> None:
    outside = subprocess.run([sys.executable, "-c", THREADS], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert outside.returncode == 0, outside.stderr
    cpus = len(os.sched_getaffinity(0))  # sessions get every CPU, decoders half of them (DECODE_THREADS' default)
    assert outside.stdout.split() == [str(cpus), str(max(1, cpus // 2))]
