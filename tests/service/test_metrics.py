"""A worker killed outright leaves its live gauges behind; the next scrape forgets them and keeps its counters."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from service.metrics import forget_dead_workers

WORKER = """
import os, signal, sys
import prometheus_client as prom
prom.Gauge("in_flight", "", multiprocess_mode="livesum").set(float(sys.argv[1]))
prom.Gauge("share", "", multiprocess_mode="livemax").set(float(sys.argv[1]))
prom.Counter("served", "").inc(float(sys.argv[1]))
print("ready", flush=True)
sys.stdin.readline()
"""


def worker(directory: Path, value: int) -> subprocess.Popen[str]:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    process = subprocess.Popen([sys.executable, "-c", WORKER, str(value)], env=env, text=True,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
    assert process.stdout is not None and process.stdout.readline() == "ready\n"
    return process


def merged(directory: Path) -> dict[str, float]:
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))
    return {sample.name: sample.value for family in registry.collect() for sample in family.samples}


def test_a_killed_workers_live_gauges_are_forgotten_and_its_counters_kept(tmp_path: Path) -> None:
    survivor, killed = worker(tmp_path, 5), worker(tmp_path, 7)
    try:
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait(10)
        assert merged(tmp_path) == {"in_flight": 12.0, "share": 7.0, "served_total": 12.0}

        assert forget_dead_workers(tmp_path, lambda: None) == []  # who lives cannot be told: nothing goes
        assert merged(tmp_path)["in_flight"] == 12.0

        assert forget_dead_workers(tmp_path, set) == [killed.pid]  # the survivor runs, if not in this server
        assert merged(tmp_path) == {"in_flight": 5.0, "share": 5.0, "served_total": 12.0}
        assert forget_dead_workers(tmp_path, set) == []  # named once
    finally:
        for process in (survivor, killed):
            process.kill()
            process.wait(10)


def test_a_death_is_named_only_by_the_sweep_that_removes_its_livesum_file(tmp_path: Path) -> None:
    """Two workers scraped at the same moment: one removed the dead one's ``livesum`` file, the other its
    ``livemax`` file; only the first counts the death."""
    dead = worker(tmp_path, 3)
    os.kill(dead.pid, signal.SIGKILL)
    dead.wait(10)
    (tmp_path / f"gauge_livesum_{dead.pid}.db").unlink()
    assert forget_dead_workers(tmp_path, set) == []
    assert not list(tmp_path.glob("gauge_live*"))


def test_a_worker_that_ends_by_itself_takes_its_gauges_along(tmp_path: Path) -> None:
    """And it has a ``livesum`` file from the start, before it serves anything: its death is counted by that
    file's removal."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    script = (
        "import os; from service.metrics import get_metrics; metrics = get_metrics(); "
        "print(sorted(os.listdir(os.environ['PROMETHEUS_MULTIPROC_DIR']))); "
        "metrics.child(metrics.in_flight, 'http').inc()"
    )
    run = subprocess.run([sys.executable, "-c", script], env=env, check=True, cwd=Path(__file__).parents[2],
                         capture_output=True, text=True)  # fmt: skip
    pid = run.stdout.split("_")[-1].split(".")[0]
    assert run.stdout.strip() == f"['counter_{pid}.db', 'gauge_livesum_{pid}.db']"
    assert [path.name for path in tmp_path.iterdir()] == [f"counter_{pid}.db"]  # its counts stay
