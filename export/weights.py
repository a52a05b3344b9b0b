"""Where a network's parameters come from: torchvision's releases, a file, or a seed.

Loading weights is a security boundary: files are hash-checked and read with
``torch.load(weights_only=True)``, which refuses to unpickle arbitrary objects.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import pickle
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .checkpoint import unwrap
from .download import download
from .spec import ReleasedWeights

logger = logging.getLogger(__name__)


class WeightsUnavailableError(RuntimeError):
    """The weights cannot be had here (no network, no cached file); the message says what to do."""


class WeightsIntegrityError(RuntimeError):
    """A weight file's content does not match the hash it is published under."""


@dataclass
class Provenance:
    """What is recorded in ``metadata.json`` about the weights."""

    kind: str  # imagenet | trained | random | file
    source: str
    url: str | None = None
    file: str | None = None
    sha256: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v not in (None, {})}


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def hub_checkpoint_dir() -> Path:
    """torch hub's standard cache (``$TORCH_HOME/hub/checkpoints``), shared with torchvision."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def fetch_released(weights: ReleasedWeights, cache_dir: Path | None = None, progress: bool = True) -> Path:
    """Download ``weights`` into the hub cache (unless there) and check its sha256 prefix.

    A cached file is checked too: a corrupt or tampered file is an error, never loaded.
    """
    cache_dir = cache_dir or hub_checkpoint_dir()
    target = cache_dir / weights.filename
    if not target.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        logger.info("Downloading %s to %s", weights.url, target)
        # under another name until whole and checked: an interrupted or bad download never reaches the cache
        partial = target.with_name(f"{target.name}.{secrets.token_hex(4)}.partial")
        try:
            digest = download(weights.url, partial, progress=progress)
            if not digest.startswith(weights.hash_prefix):
                raise WeightsIntegrityError(
                    f"{weights.url} downloaded with the wrong sha256 ({digest[:12]}...): {weights.filename} is "
                    f"published with prefix {weights.hash_prefix}; nothing was kept, try again or pass "
                    "--weights-file PATH"
                )
            os.replace(partial, target)
        except (OSError, http.client.HTTPException) as exc:  # no network, DNS, 404, a stall, a cut-off body
            raise _unavailable(weights, exc) from exc
        finally:
            partial.unlink(missing_ok=True)
    digest = sha256_file(target)
    if not digest.startswith(weights.hash_prefix):
        raise WeightsIntegrityError(
            f"{target} has sha256 {digest[:12]}..., but {weights.filename} is published with prefix "
            f"{weights.hash_prefix}; delete the file and fetch it again"
        )
    return target


def _unavailable(weights: ReleasedWeights, exc: Exception) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"cannot fetch {weights.url} ({type(exc).__name__}: {exc}); pass --weights-file PATH with a copy of "
        f"{weights.filename}, or --weights random for an untrained graph"
    )


# What a file that torch.save did not write most often is, by its first bytes (torch.save writes a zip archive;
# its legacy format, and a bare pickle, start with the pickle protocol's 0x80)
_NOT_TORCH = {b"\xff\xd8\xff": "a JPEG image", b"\x89PNG": "a PNG image", b"\x93NUMPY": "a NumPy .npy file",
              b"\x89HDF": "an HDF5 file (Keras?)", b"\x08": "an ONNX graph, most likely", b"PK\x03\x04": "",
              b"\x80": "", b"{": "JSON text"}  # fmt: skip
_OLD_PICKLE = b"L119547037146038801333356L"  # torch.save's legacy format with pickle protocol 0 or 1
_SAFETENSORS = ("a safetensors file: load it with safetensors.torch.load_file and torch.save the state dict it "
                "gives")  # fmt: skip


def read_checkpoint(path: Path) -> tuple[Mapping[str, Tensor], str]:
    """The state dict in a ``torch.save`` file, read without unpickling code: a plain
    ``model.state_dict()`` or one of the common wrappers (``checkpoint.unwrap``); and what was found."""
    try:
        with open(path, "rb") as stream:
            head = stream.read(26)
    except IsADirectoryError:
        head = b"PK\x03\x04"  # torch.load says what a folder is, below
    except OSError as exc:
        raise ValueError(f"{path} cannot be read ({exc.strerror})") from None
    # safetensors: an 8-byte little-endian header length, then the JSON header
    safetensors = head[8:10] in (b'{"', b"{ ") and int.from_bytes(head[:8], "little") < 100_000_000
    if head.startswith(_OLD_PICKLE):
        raise ValueError(
            f"{path} was saved with pickle protocol 0 or 1, which torch.load reads only by unpickling "
            "code: load it where you trust it and torch.save(state_dict, PATH) it with the defaults"
        )
    kind = _SAFETENSORS if safetensors else next((k for magic, k in _NOT_TORCH.items() if head.startswith(magic)), None)
    if head and kind != "":  # empty: torch.load's own words below
        raise ValueError(f"{path} is not a file torch.save wrote ({kind or 'its first bytes are ' + repr(head[:8])})"
                         "; pass the file torch.save(model.state_dict(), PATH) wrote")  # fmt: skip
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).splitlines()[-1] if str(exc) else "not a torch file"
        raise ValueError(f"{path} holds more than tensors; refusing to unpickle it ({reason})") from None
    except (EOFError, KeyError, RuntimeError, IsADirectoryError, IndexError) as exc:  # empty, cut short, a folder
        reason = (str(exc).strip().splitlines() or ["no details"])[0]
        raise ValueError(f"{path} is not a whole torch checkpoint ({type(exc).__name__}: {reason}); pass the "
                         "file torch.save(model.state_dict(), PATH) wrote") from None  # fmt: skip
    return unwrap(loaded, str(path))


def load_state_dict(path: Path) -> Mapping[str, Tensor]:
    """The state dict in a ``torch.save`` file (see :func:`read_checkpoint`)."""
    return read_checkpoint(path)[0]


def released_state_dict(
    weights: ReleasedWeights, cache_dir: Path | None = None, progress: bool = True
) -> tuple[Mapping[str, Tensor], Provenance]:
    path = fetch_released(weights, cache_dir, progress)
    provenance = Provenance(
        kind="imagenet",
        source="torchvision IMAGENET1K_V1 release",
        url=weights.url,
        file=weights.filename,
        sha256=sha256_file(path),
        details={"imagenet_top1": weights.top1},
    )
    return load_state_dict(path), provenance


def file_state_dict(path: Path) -> tuple[Mapping[str, Tensor], Provenance]:
    if not path.is_file():
        raise WeightsUnavailableError(f"--weights-file {path} " + ("is a folder, not a file" if path.is_dir()
                                                                  else "does not exist"))  # fmt: skip
    state, found = read_checkpoint(path)
    logger.info("%s: %s", path, found)
    provenance = Provenance(kind="file", source="user-supplied state dict", file=path.name, sha256=sha256_file(path),
                            details={"found": found})  # fmt: skip
    return state, provenance


def random_provenance(seed: int) -> Provenance:
    return Provenance(
        kind="random",
        source="seeded random initialisation: for tests and benchmarks only, predictions are meaningless",
        details={"seed": seed},
    )
