"""Files that repeat what another file says, checked so they cannot drift apart."""

from __future__ import annotations

import tomllib

from .helpers import ROOT


def test_bento_requirements_are_the_serving_dependencies() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    serve = (ROOT / "requirements" / "serve.txt").read_text().splitlines()
    pinned = [line for line in serve if line and not line.startswith("#")]
    assert pinned == pyproject["project"]["dependencies"]
    assert not any(line.startswith("torch") for line in pinned)  # serving needs no torch
