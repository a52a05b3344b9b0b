"""Writing a version into the store: staged beside it, renamed into place whole, then the model's own files.

A version's folder is complete or absent (the service and Triton never see half of one); the model's
``labels.txt`` (the latest version's, which Triton reads) and ``config.pbtxt`` are replaced atomically
after it, so an export stopped at any point leaves no file naming a version that does not exist. The
operator's choices in ``config.pbtxt`` (``version_policy``, ``max_batch_size``) outlive a new export.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from service.store.batch_limit import parse_max_batch_size
from service.store.layout import CONFIG_FILE, LABELS_FILE
from service.store.policy import parse_version_policy

logger = logging.getLogger(__name__)

STAGING_PREFIX = ".staging-"
# the blocks the export writes and an operator edits, in the text of a config.pbtxt (see service.store.policy)
_POLICY_BLOCK = re.compile(r"version_policy\s*:?\s*\{\s*\w+\s*:?\s*\{[^{}]*\}\s*\}")
_LIMIT_FIELD = re.compile(r"(?<![\w.])max_batch_size\s*:\s*[^\s,;{}\]\[]+")


def staging_dir(model_dir: Path) -> Path:
    """A new folder to build a version in, named by this process; those that exports killed outright left (their
    process gone) are removed first: a VGG's is half a gigabyte."""
    for left in model_dir.glob(f"{STAGING_PREFIX}*"):
        owner = left.name.removeprefix(STAGING_PREFIX).split("-", 1)[0]
        if owner.isdigit() and not _running(int(owner)):
            shutil.rmtree(left, ignore_errors=True)
            logger.info("removed %s, left by an export that stopped (pid %s)", left, owner)
    return Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=model_dir))


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def publish(staging: Path, model_dir: Path, version: int, labels: str, config: str) -> Path:
    """``staging`` as ``model_dir/version``, readable as the umask allows (a temporary folder is the owner's
    only: a service running as another user could not read it), then the model's labels and configuration."""
    os.chmod(staging, 0o777 & ~_umask())
    target = model_dir / str(version)
    staging.rename(target)  # atomic: a version folder is complete or absent
    _replace(model_dir / LABELS_FILE, labels)
    _replace(model_dir / CONFIG_FILE, config)
    return target


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _replace(path: Path, text: str) -> None:
    staged = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    staged.write_text(text, encoding="utf-8")
    os.replace(staged, path)


def kept_settings(generated: str, existing: Path) -> str:
    """``generated`` (a new export's ``config.pbtxt``) with the ``version_policy`` and ``max_batch_size`` of the
    model's ``existing`` one: an operator's pin (``specific: { versions: [1] }``) or lower limit stays. Where the
    existing one cannot be read as this service reads it, ``generated`` as it is, and a warning says so."""
    try:
        old = existing.read_text(encoding="utf-8")
    except FileNotFoundError:
        return generated
    try:
        policy, limit = parse_version_policy(old), parse_max_batch_size(old)
    except ValueError as exc:
        logger.warning("%s: %s; written anew with the export's version_policy and max_batch_size", existing, exc)
        return generated
    text = _POLICY_BLOCK.sub(lambda _: policy.pbtxt(), generated, count=1)
    if _POLICY_BLOCK.search(text) is None:
        text = text.rstrip("\n") + "\n" + policy.pbtxt() + "\n"
    if limit is not None:
        text = _LIMIT_FIELD.sub(f"max_batch_size: {limit}", text, count=1)
    return text
