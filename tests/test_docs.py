"""The README's generated tables match the code they describe."""

from __future__ import annotations

import re

from export.cli import model_table
from service.settings import Settings

from .helpers import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")


def _section(name: str) -> str:
    match = re.search(rf"<!-- {name}:start -->\n(.*?)<!-- {name}:end -->", README, re.S)
    assert match, f"README has no {name} section"
    return match.group(1).strip()


def test_model_table_is_generated_from_the_registry() -> None:
    assert _section("model-table") == model_table(markdown=True)


def test_every_setting_is_documented_with_its_default() -> None:
    table = _section("settings-table")
    for name, field in Settings.model_fields.items():
        default = field.default
        if default is None:
            shown = "(unset)"
        elif default in ("", ()):
            shown = "(empty)"
        else:
            shown = f"`{default}`"
        assert f"| `{name.upper()}` | {shown} | {field.description} |" in table, name
