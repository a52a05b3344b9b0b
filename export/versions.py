"""Writing a version into the store: staged beside it, renamed into place whole, then the model's own files.

A version's folder is complete or absent (the service and Triton never see half of one); the model's
``labels.txt`` (the latest version's, which Triton reads) and ``config.pbtxt`` are replaced atomically
after it, so an export stopped at any point leaves no file naming a version that does not exist. The
operator's choices in ``config.pbtxt`` (``version_policy``, ``max_batch_size``) outlive a new export.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from service.store.atomic import replace_text
from service.store.batch_limit import LIMIT_FIELD, parse_max_batch_size
from service.store.layout import CONFIG_FILE, LABELS_FILE
from service.store.policy import POLICY_BLOCK, VersionPolicy, masked, parse_version_policy

logger = logging.getLogger(__name__)

STAGING_PREFIX = ".staging-"
STALE_S = 3600.0  # a staging folder untouched this long, no export holding it, is swept
_STAGED = re.compile(r"(\d+)(?:\.\d+)?@(.+)-[^-]+")  # pid@host-random after the prefix (pid.namespace@ earlier)


# Ctrl-C and SIGTERM, with the CLI's handler (:func:`interrupt`): raised at once, except while a version is being
# put in place or a staging folder removed, where they wait for that to end (a version's folder without its
# model's labels and configuration, or half a staging folder, would be left otherwise)
_holding = 0
_held_back = False


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Ctrl-C and SIGTERM held back until the block ends (where :func:`interrupt` handles them), then raised."""
    global _holding, _held_back
    _holding += 1
    try:
        yield
    finally:
        _holding -= 1
        if not _holding and _held_back:
            _held_back = False
            raise KeyboardInterrupt


def interrupt(signum: int, frame: object) -> None:
    """A handler for SIGINT and SIGTERM: ``KeyboardInterrupt`` now, or at the end of an :func:`uninterrupted`
    block under way."""
    global _held_back
    if _holding:
        _held_back = True
        return
    raise KeyboardInterrupt


@contextlib.contextmanager
def staging(model_dir: Path) -> Iterator[Path]:
    """A new folder to build a version in (and the model's folder, where this is its first), readable as the umask
    allows (the service may run as another user; :func:`publish` renames it as it is), held until the block ends
    (an ``flock`` on the folder, released by the kernel however the export ends), then removed unless published,
    and the model's folder with it if that leaves it empty.

    Folders that exports killed outright left on this host are removed first (no one holds them, untouched for
    an hour): a VGG's is half a gigabyte. The lock is seen across processes, pid namespaces and containers of
    one kernel; another host's folders are left alone (not every shared filesystem carries locks between hosts).
    """
    host = socket.gethostname()
    for left in model_dir.glob(f"{STAGING_PREFIX}*"):
        owner = _STAGED.fullmatch(left.name.removeprefix(STAGING_PREFIX))
        if owner is not None and owner.group(2) == host:
            _sweep(left)
    folder = model_dir / f"{STAGING_PREFIX}{os.getpid()}@{host}-{secrets.token_hex(6)}"
    for _ in range(3):  # the model's folder made here; another export's failure may remove it in between (below)
        model_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            folder.mkdir()
            break
    else:
        folder.mkdir()  # its error, as it is
    held = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        yield folder
    finally:
        with uninterrupted():
            shutil.rmtree(folder, ignore_errors=True)  # published: renamed away, nothing is left here
            os.close(held)
            # a first export that failed: no empty model folder (Triton, given the store, fails to start on one)
            with contextlib.suppress(OSError):  # not empty: versions, configuration or another export's staging
                model_dir.rmdir()


def _sweep(left: Path) -> None:
    with contextlib.suppress(OSError):  # gone meanwhile, or held (BlockingIOError): an export is writing it
        if time.time() - left.stat().st_mtime <= STALE_S:
            return
        unheld = os.open(left, os.O_RDONLY)
        try:
            fcntl.flock(unheld, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(left, ignore_errors=True)
            logger.info("removed %s, left by an export that stopped", left)
        finally:
            os.close(unheld)


@contextlib.contextmanager
def publishing(model_dir: Path) -> Iterator[None]:
    """One export of the model at a time from picking its version number to :func:`publish`: two exports of one
    model at once would otherwise pick the same number, and the second's rename would fail (``Directory not
    empty``) after all its work, or its labels land after the newer version's. An ``flock`` on the model's
    folder, released by the kernel however the export ends; the work before it runs side by side."""
    held = os.open(model_dir, os.O_RDONLY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)  # a signal while waiting for it interrupts at once
        with uninterrupted():  # from the number picked to the model's files replaced: whole, or not begun
            yield
    finally:
        os.close(held)


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
