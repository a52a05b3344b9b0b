"""Atomic replacement of the files other processes read."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from service.store.atomic import replace_text


def test_a_file_is_replaced_whole_and_a_failed_replace_leaves_no_staging_behind(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    replace_text(target, "first")
    replace_text(target, "second")
    assert target.read_text() == "second"
    blocked = tmp_path / "blocked"
    blocked.mkdir()  # a folder where the file should be: the rename fails after the staging file was written
    with pytest.raises(OSError):
        replace_text(blocked, "lost")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocked", "state.json"]


def test_threads_writing_one_file_at_once_each_leave_it_whole(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    texts = ["a" * 100_000, "b" * 100_000]
    failures: list[BaseException] = []

    def write(text: str) -> None:
        try:
            for _ in range(100):
                replace_text(target, text)
        except BaseException as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=write, args=(text,)) for text in texts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == [] and target.read_text() in texts
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
