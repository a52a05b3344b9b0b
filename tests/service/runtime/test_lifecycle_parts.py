"""The lifecycle's parts without a server: version policy, integrity, the declared state, tokens."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest

from service.frontends.auth import Access, check_access
from service.runtime.lifecycle import DeclaredState, management_warning
from service.settings import Settings
from service.store.integrity import IntegrityChecker
from service.store.layout import StoredVersion
from service.store.policy import parse_version_policy


@pytest.mark.parametrize(
    ("text", "available", "served"),
    [
        ('name: "m"\nplatform: "onnxruntime_onnx"\n', [1, 2, 3], [3]),  # none written: Triton's latest 1
        ("version_policy: { latest: { num_versions: 2 } }", [3, 1, 2], [2, 3]),
        ("version_policy { latest { num_versions: 5 } }", [1, 2], [1, 2]),
        ("version_policy: { specific: { versions: [1, 3] } }", [1, 2, 3], [1, 3]),
        ("version_policy: { specific: { versions: 2 versions: 4 } }", [1, 2, 3], [2]),
        ("version_policy: { all: { } }", [2, 1, 7], [1, 2, 7]),
        ("version_policy < latest < num_versions: 2 > >", [1, 2, 3], [2, 3]),  # protobuf text's other delimiters
        ("# version_policy: { all: { } }\n", [1, 2], [2]),  # a comment is not a policy
    ],
)
def test_version_policies_select_as_triton_does(text: str, available: list[int], served: list[int]) -> None:
    assert parse_version_policy(text).select(available) == served


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("version_policy: { latest: { num_versions: 0 } }", "N >= 1"),
        ("version_policy: { specific: { versions: [] } }", "positive integers"),
        ("version_policy: { newest: { } }", "unknown version_policy 'newest'"),
        ("version_policy: latest", "not of the form"),
        ('version_policy: { specific: { versions: [1, "2"] } }', "positive integers"),  # Triton refuses it too
    ],
)
def test_a_bad_policy_says_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_version_policy(text)


def version(tmp_path: Path, graph: bytes, recorded: bytes | None = None) -> StoredVersion:
    directory = tmp_path / "m" / "1"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.onnx").write_bytes(graph)
    digest = hashlib.sha256(graph if recorded is None else recorded).hexdigest()
    (directory / "metadata.json").write_text(json.dumps({"onnx": {"sha256": digest}}))
    return StoredVersion("m", 1, directory)


def test_a_complete_version_passes(tmp_path: Path) -> None:
    assert IntegrityChecker(settle=60).check(version(tmp_path, b"graph")).state == "complete"


def test_a_mismatch_is_a_copy_in_progress_until_the_files_settle(tmp_path: Path) -> None:
    stored = version(tmp_path, b"gra", recorded=b"graph")
    checker = IntegrityChecker(settle=0.2)
    first = checker.check(stored)
    assert first.state == "incomplete" and "copy in progress" in first.reason
    time.sleep(0.3)
    settled = checker.check(stored)
    assert settled.state == "corrupt" and "sha256 does not match" in settled.reason
    (stored.graph).write_bytes(b"graph")  # the copy finishes
    assert checker.check(stored).state == "complete"


def test_missing_metadata_is_incomplete_not_failed(tmp_path: Path) -> None:
    stored = version(tmp_path, b"graph")
    stored.metadata_path.unlink()
    verdict = IntegrityChecker(settle=60).check(stored)
    assert verdict.state == "incomplete" and "metadata.json is missing" in verdict.reason


def test_the_declared_state_counts_generations_and_keeps_the_first_declaration(tmp_path: Path) -> None:
    state = DeclaredState(tmp_path / "shared" / "state.json")
    assert state.read() is None
    assert state.initialize({"lenet5": [1]}) == {"generation": 1, "models": {"lenet5": [1]}}
    assert state.initialize({"other": [9]})["models"] == {"lenet5": [1]}  # a second worker does not overwrite
    assert state.declare("resnet18", [1, 2]) == 2
    assert state.declare("lenet5", None) == 3
    assert state.read() == {"generation": 3, "models": {"resnet18": [1, 2]}}
    (tmp_path / "shared" / "state.json").write_text("{ half")
    with pytest.raises(ValueError, match="unreadable"):
        state.read()


@pytest.mark.parametrize(
    ("authorization", "api", "admin", "management", "expected"),
    [
        (None, "api", "adm", True, Access.MISSING),
        ("Bearer api", "api", "adm", True, Access.FORBIDDEN),
        ("Bearer wrong", "api", "adm", True, Access.MISSING),
        ("Bearer adm", "api", "adm", True, Access.GRANTED),
        ("Bearer adm", "api", "adm", False, Access.GRANTED),  # the admin token also opens inference
        ("Bearer api", "api", None, True, Access.GRANTED),  # no ADMIN_TOKEN: API_TOKEN guards management
        (None, None, "adm", False, Access.GRANTED),  # only ADMIN_TOKEN: inference stays open
        (None, None, None, True, Access.GRANTED),
    ],
)
def test_who_may_call_what(
    authorization: str | None, api: str | None, admin: str | None, management: bool, expected: Access
) -> None:
    assert check_access(authorization, api, admin, management)[0] is expected


@pytest.mark.parametrize(
    ("env", "warned"),
    [
        ({"MODEL_CONTROL": "explicit"}, "anyone who reaches the port can load and unload models"),
        ({"MODEL_CONTROL": "explicit", "API_TOKEN": "api"}, "every client holding API_TOKEN can load and unload"),
        ({"MODEL_CONTROL": "explicit", "API_TOKEN": "api", "ADMIN_TOKEN": "boss"}, None),
        ({"MODEL_CONTROL": "none"}, None),
    ],
)
def test_explicit_control_without_an_admin_token_warns_who_may_manage_models(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], warned: str | None
) -> None:
    for name in ("MODEL_CONTROL", "API_TOKEN", "ADMIN_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    warning = management_warning(Settings())
    assert (warning is None) if warned is None else (warning is not None and warned in warning)
