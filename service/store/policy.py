"""Which versions of a model to serve: Triton's ``version_policy``, read from the model's ``config.pbtxt``.

The same file governs this service and Triton, so it is parsed here, not restated in a
setting. The three policies of Triton's ``ModelVersionPolicy``::

    version_policy: { latest: { num_versions: 2 } }     # the N highest versions (the default, N = 1)
    version_policy: { specific: { versions: [1, 3] } }  # exactly these
    version_policy: { all: { } }                        # every version
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

POLICY_BLOCK = re.compile(r"version_policy\s*:?\s*\{\s*(\w+)\s*:?\s*\{([^{}]*)\}\s*\}", re.S)
# protobuf text format's string literals (either quote, backslash escapes) and its only comments, `#` to the line's end
_STRING_OR_COMMENT = re.compile(r""""(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'|#[^\n]*""")


def without_strings_and_comments(text: str) -> str:
    """A ``config.pbtxt``'s text with its comments removed and its strings emptied, so that neither a ``#`` nor a
    field's name inside a string (a parameter's value, say) is read as structure."""
    return _STRING_OR_COMMENT.sub(lambda match: "" if match.group().startswith("#") else '""', text)


def masked(text: str) -> str:
    """A ``config.pbtxt``'s text with its comments and the insides of its strings blanked (a string keeps its
    quotes: still a value, one no number field takes), same length (so that a span found in it is the text's
    span), and protobuf's ``< >`` delimiters as ``{ }``."""
    blanked = _STRING_OR_COMMENT.sub(_blank, text)
    return blanked.replace("<", "{").replace(">", "}")


def _blank(match: re.Match[str]) -> str:
    found = match.group()
    if found.startswith("#"):
        return " " * len(found)
    return found[0] + " " * (len(found) - 2) + found[-1]


@dataclass(frozen=True)
class VersionPolicy:
    kind: Literal["latest", "specific", "all"] = "latest"
    num_versions: int = 1
    versions: tuple[int, ...] = ()

    def pbtxt(self) -> str:
        """The policy as ``config.pbtxt`` writes it."""
        if self.kind == "all":
            return "version_policy: { all: { } }"
        if self.kind == "specific":
            return f"version_policy: {{ specific: {{ versions: [{', '.join(map(str, self.versions))}] }} }}"
        return f"version_policy: {{ latest: {{ num_versions: {self.num_versions} }} }}"

    def select(self, available: list[int]) -> list[int]:
        """The versions to serve among ``available`` (any order), ascending."""
        ordered = sorted(set(available))
        if self.kind == "all":
            return ordered
        if self.kind == "specific":
            return [v for v in ordered if v in self.versions]
        return ordered[-self.num_versions :]


def parse_version_policy(text: str) -> VersionPolicy:
    """The policy in a ``config.pbtxt``'s text; Triton's default (latest 1) when it names none.

    Raises ``ValueError`` naming what is wrong, for a policy Triton would refuse too.
    """
    text = masked(text)  # protobuf's text format also delimits a message with < and >
    if "version_policy" not in text:
        return VersionPolicy()
    match = POLICY_BLOCK.search(text)
    if match is None:
        raise ValueError("version_policy is not of the form `version_policy: { latest|specific|all: { ... } }`")
    kind, body = match.group(1), match.group(2)
    if kind == "all":
        return VersionPolicy("all")
    if kind == "latest":
        found = re.search(r"num_versions\s*:\s*(\d+)", body)
        if found is None or int(found.group(1)) < 1:
            raise ValueError("version_policy latest needs `num_versions: N` with N >= 1")
        return VersionPolicy("latest", num_versions=int(found.group(1)))
    if kind == "specific":
        listed = re.findall(r"versions\s*:\s*\[([^\]]*)\]", body)
        numbers = [n for group in listed for n in re.split(r"[\s,]+", group.strip()) if n]
        numbers += re.findall(r"versions\s*:\s*(\d+)", body)  # the repeated-field form
        if not numbers or not all(n.isdigit() and int(n) > 0 for n in numbers):
            raise ValueError("version_policy specific needs `versions: [1, 2, ...]` of positive integers")
        return VersionPolicy("specific", versions=tuple(sorted({int(n) for n in numbers})))
    raise ValueError(f"unknown version_policy {kind!r}: use latest, specific or all")


def config_text(config: Path) -> str:
    """A ``config.pbtxt``'s text; empty where the model has none (every field then takes Triton's default)."""
    try:
        return config.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ""


def read_version_policy(config: Path) -> VersionPolicy:
    """The policy of a ``config.pbtxt``; a model without one is served as Triton would (latest 1)."""
    return parse_version_policy(config_text(config))
