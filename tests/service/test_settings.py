"""Settings as an environment writes them: empty values mean the default, lists are comma-separated, and a
combination that cannot work is refused at start with what would be right."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import Settings, setting_problems


@pytest.mark.parametrize(
    ("env", "read"),
    [
        ({"MODEL_STORE": "/srv/store", "MODEL_CONTROL_STATE": ""},
         lambda s: s.control_state_path == Path("/srv/store/.model-control.json")),
        ({"CANARY_STATE": "  "}, lambda s: s.canary_state is None),
        ({"API_TOKEN": "s3cret\n"}, lambda s: s.api_token.get_secret_value() == "s3cret"),  # from a secret file
        ({"ADMIN_TOKEN": ""}, lambda s: s.admin_token is None),
        ({"WARMUP_BATCHES": ""}, lambda s: s.warmup_batches == ()),
        ({"WARMUP_BATCHES": "1, 8"}, lambda s: s.warmup_batches == (1, 8)),
        ({"WARMUP_BATCHES": "[1,8,32]"}, lambda s: s.warmup_batches == (1, 8, 32)),
    ],
    ids=["state empty", "canary state blank", "token newline", "admin token empty", "warm-up empty",
         "warm-up list", "warm-up json"],
)  # fmt: skip
def test_an_environment_as_people_write_it(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], read) -> None:  # type: ignore[no-untyped-def]
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert read(Settings())


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"HTTP_PORT": "8001"}, "HTTP_PORT and GRPC_PORT are both 8001: give each its own"),
        ({"WARMUP_BATCHES": "0,8"}, "WARMUP_BATCHES [0, 8]: every batch size must be at least 1"),
        ({"WARMUP_BATCHES": "one"}, "WARMUP_BATCHES 'one': use batch sizes, e.g. 1,8,32"),
    ],
)
def test_settings_that_cannot_work_are_refused_with_what_would(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], says: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=says.replace("[", r"\[").replace("]", r"\]")):
        Settings()


@pytest.mark.usefixtures("no_settings_in_the_environment")  # only the two settings given are wrong
def test_a_secret_that_fails_validation_is_not_echoed() -> None:
    with pytest.raises(ValidationError) as raised:
        Settings(api_token=12345678, max_top_k=0)  # type: ignore[arg-type]  # not text: refused
    assert sorted(setting_problems(raised.value)) == [
        "API_TOKEN=(hidden): Input should be a valid string",
        "MAX_TOP_K=0: Input should be greater than or equal to 1",
    ]
