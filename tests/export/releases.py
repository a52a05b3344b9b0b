"""What the export tests share: weight files shaped like torchvision's releases."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from export.spec import ReleasedWeights


def release_file(directory: Path, stem: str, state: dict[str, torch.Tensor]) -> tuple[Path, ReleasedWeights]:
    """A file named like torchvision's releases, ``<stem>-<sha256 prefix>.pth``, served from file://."""
    staging = directory / "staging.pth"
    torch.save(state, staging)
    prefix = hashlib.sha256(staging.read_bytes()).hexdigest()[:8]
    path = directory / f"{stem}-{prefix}.pth"
    staging.rename(path)
    return path, ReleasedWeights(url=path.as_uri(), top1=0.0)
