"""Writing a version into the store: staged beside it, renamed into place whole, then the model's own files.

A version's folder is complete or absent (the service and Triton never see half of one); the model's
``labels.txt`` (the latest version's, which Triton reads) and ``config.pbtxt`` are replaced atomically
after it, so an export stopped at any point leaves no file naming a version that does not exist. The
operator's choices in ``config.pbtxt`` (``version_policy``, ``max_batch_size``) outlive a new export.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import socket
import time
from pathlib import Path

from service.store.atomic import replace_text
from service.store.batch_limit import LIMIT_FIELD, parse_max_batch_size
from service.store.layout import CONFIG_FILE, LABELS_FILE
from service.store.policy import POLICY_BLOCK, VersionPolicy, masked, parse_version_policy

logger = logging.getLogger(__name__)

STAGING_PREFIX = ".staging-"
STALE_S = 3600.0  # a staging folder untouched this long, its export gone from this host, is swept
# pid.pid namespace@host-random, after the prefix (without the namespace: named by an earlier version)
_STAGED = re.compile(r"(\d+)(?:\.(\d+))?@(.+)-[^-]+")


def staging_dir(model_dir: Path) -> Path:
    """A new folder to build a version in, named by this process, its pid namespace and its host, readable as the
    umask allows (the service may run as another user; :func:`publish` renames the folder as it is). Those that
    exports killed outright left (their process gone, the folder untouched for an hour) are removed first: a
    VGG's is half a gigabyte. Another host's, or another pid namespace's (a container's sharing the volume, even
    under the same hostname), is left alone: its pid means nothing here."""
    host, namespace = socket.gethostname(), _pid_namespace()
    for left in model_dir.glob(f"{STAGING_PREFIX}*"):
        owner = _STAGED.fullmatch(left.name.removeprefix(STAGING_PREFIX))
        if owner is None or owner.group(3) != host or int(owner.group(2) or namespace) != namespace:
            continue
        if _running(int(owner.group(1))):
            continue
        with contextlib.suppress(OSError):
            if time.time() - left.stat().st_mtime > STALE_S:
                shutil.rmtree(left, ignore_errors=True)
                logger.info("removed %s, left by an export that stopped (pid %s)", left, owner.group(1))
    staging = model_dir / f"{STAGING_PREFIX}{os.getpid()}.{namespace}@{host}-{secrets.token_hex(6)}"
    staging.mkdir()
    return staging


def _pid_namespace() -> int:
    """This process's pid namespace (the inode of /proc/self/ns/pid); 0 where it cannot be read."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def publish(staging: Path, model_dir: Path, version: int, labels: str, config: str) -> Path:
    """``staging`` as ``model_dir/version``, then the model's labels and configuration."""
    target = model_dir / str(version)
    staging.rename(target)  # atomic: a version folder is complete or absent
    replace_text(model_dir / LABELS_FILE, labels)
    replace_text(model_dir / CONFIG_FILE, config)
    return target


def with_settings(text: str, policy: VersionPolicy, limit: int | None = None) -> str:
    """``text`` (a ``config.pbtxt``) with ``policy`` in place of its ``version_policy`` (added where it has none),
    and ``limit`` in place of its ``max_batch_size`` where given; comments and strings are left as they are.

    Raises ``ValueError`` where ``text`` has a ``version_policy`` not of a form to replace (a second one would be
    added, which Triton refuses).
    """
    blanked = masked(text)
    edits = []
    found = POLICY_BLOCK.search(blanked)
    if found is None and "version_policy" in blanked:  # as parse_version_policy tells
        raise ValueError("its version_policy is not of the form `version_policy: { latest|specific|all: { ... } }`")
    edits.append((found.start(), found.end(), policy.pbtxt()) if found else (len(text), len(text), ""))
    if limit is not None and (field := LIMIT_FIELD.search(blanked)) is not None:
        edits.append((field.start(), field.end(), f"max_batch_size: {limit}"))
    for start, end, replacement in sorted(edits, reverse=True):
        text = text[:start] + replacement + text[end:]
    if found is None:
        text = text.rstrip("\n") + "\n" + policy.pbtxt() + "\n"
    return text


def kept_settings(generated: str, existing: Path) -> str:
    """``generated`` (a new export's ``config.pbtxt``) with the ``version_policy`` and ``max_batch_size`` of the
    model's ``existing`` one: an operator's pin (``specific: { versions: [1] }``) or batch limit stays. Where the
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
    return with_settings(generated, policy, limit)
