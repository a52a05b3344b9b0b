"""The model store's layout, a valid Triton model repository::

    <root>/<name>/config.pbtxt            Triton's model configuration
    <root>/<name>/labels.txt              one class name per line, index = class id (the latest's)
    <root>/<name>/<version>/model.onnx
    <root>/<name>/<version>/metadata.json
    <root>/<name>/<version>/labels.txt    the version's own class names (exports since custom heads)

A version's labels are its own ``labels.txt`` where it has one, else the model's: a model
whose classes change from one version to the next (a fine-tune with another class) keeps
each version's answers named right; Triton reads the model's, which the export keeps equal
to the latest version's.

The export stage writes it and the service reads it, both through this module, so the
layout is written down once.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GRAPH_FILE = "model.onnx"
METADATA_FILE = "metadata.json"
LABELS_FILE = "labels.txt"
CONFIG_FILE = "config.pbtxt"

# Model names double as directory names, URL path segments and metric labels.
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")  # whole: "$" would let a trailing newline through


def is_valid_name(name: str) -> bool:
    """True for a name that is safe as a directory name (no separators, no ``..``)."""
    return bool(_NAME_RE.fullmatch(name)) and ".." not in name


@dataclass(frozen=True)
class StoredVersion:
    name: str
    version: int
    directory: Path

    @property
    def graph(self) -> Path:
        return self.directory / GRAPH_FILE

    @property
    def metadata_path(self) -> Path:
        return self.directory / METADATA_FILE

    def read_metadata(self) -> dict[str, Any]:
        """The version's metadata; raises ``OSError`` or ``ValueError`` where it is missing or not JSON."""
        data = json.loads(self.metadata_path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"{self.metadata_path} does not hold a JSON object")
        return data


class ModelStore:
    """A directory of ``<name>/<version>/`` folders."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def model_dir(self, name: str) -> Path:
        if not is_valid_name(name):
            raise ValueError(f"Invalid model name {name!r}: use lower-case letters, digits, '_', '-' and '.'")
        return self.root / name

    def labels_path(self, name: str) -> Path:
        return self.model_dir(name) / LABELS_FILE

    def names(self) -> list[str]:
        """Models with at least one version, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if is_valid_name(p.name) and self.versions(p.name))

    def versions(self, name: str) -> list[StoredVersion]:
        """The model's versions, oldest first; a version is a folder named by a positive integer."""
        directory = self.model_dir(name)
        try:
            entries = list(directory.iterdir())
        except (FileNotFoundError, NotADirectoryError):  # none, or removed as it is read (a first export that failed)
            return []
        found = [int(p.name) for p in entries if p.is_dir() and p.name.isdigit() and int(p.name) > 0]
        return [StoredVersion(name, v, directory / str(v)) for v in sorted(found)]

    def latest(self, name: str) -> StoredVersion | None:
        versions = self.versions(name)
        return versions[-1] if versions else None

    def next_version(self, name: str) -> int:
        latest = self.latest(name)
        return 1 if latest is None else latest.version + 1

    def read_labels(self, name: str, version: StoredVersion | None = None) -> list[str]:
        """The class names of ``version`` (its own ``labels.txt``, else the model's), or the model's."""
        own = None if version is None else version.directory / LABELS_FILE
        path = own if own is not None and own.is_file() else self.labels_path(name)
        return path.read_text(encoding="utf-8").splitlines()
