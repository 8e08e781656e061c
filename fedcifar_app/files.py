"""Atomic file writes: the one writer every part of the app uses. Flower-free, torch-free.

A reader (a person, a resuming run, a plot refresh, a second process) sees the old file or
the new one, never half of one, and a failed write (a full disk, a read-only file system, a
folder deleted under it) leaves no debris beside the target. A new file gets the mode a plain
``open()`` gives it (0644 under umask 022, default ACLs applied), a rewritten one keeps its
mode: run folders, deploy folders and the decode cache are read by other accounts (a group, a
web server), so nothing is made private here. Secrets are written elsewhere, 0600 on purpose
(deploy.certificates.write_private).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
from pathlib import Path
from typing import Any

# What a failed write means and what fixes it, by errno; see ``write_problem``.
_PROBLEMS = {
    errno.ENOSPC: ("the disk is full", "free space on it"),
    errno.EDQUOT: ("the disk quota is used up", "free space within the quota"),
    errno.EROFS: ("the file system is read-only", "remount it read-write"),
    errno.EACCES: ("permission denied", "give write permission back"),
    errno.EPERM: ("operation not permitted", "give write permission back"),
    errno.ENOENT: ("the folder is gone (deleted or moved while in use)", "recreate it"),
    errno.EMFILE: ("this process has too many open files", "raise the open-files limit (ulimit -n)"),
    errno.ENFILE: ("the system has too many open files", "close other programs or raise fs.file-max"),
    errno.EIO: ("an input/output error on the disk", "check the disk (dmesg)"),
}


def write_problem(err: OSError) -> tuple[str, str]:
    """(what happened, what fixes it) for an OSError of a write, in a user's words, e.g. ("the disk is
    full (No space left on device)", "free space on it"). Callers add their own alternative (another
    output-dir, --out, --dir) and what comes next."""
    what, fix = _PROBLEMS.get(err.errno or 0, ("the write failed", "fix that"))
    detail = err.strerror or type(err).__name__
    return (what if what.lower() == detail.lower() else f"{what} ({detail})"), fix


def _new_file(folder: Path, prefix: str) -> tuple[int, Path]:
    """A new file beside the target, created as ``open()`` creates one (mode 0666 less the umask;
    ``tempfile.mkstemp`` would make it 0600)."""
    path = folder / f"{prefix}{secrets.token_hex(8)}.tmp"
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666), path


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write a temporary file in the target's folder, fsync it, rename it over the target, fsync the folder
    (so after a crash the target is the old file or the new one, never cut short). On any failure the
    temporary file is removed, so a full disk is not filled further, and the OSError is raised."""
    path = Path(path)
    try:
        handle, temporary = _new_file(path.parent, f".{path.name}.")
    except OSError as err:
        err.filename = str(path)
        raise
    try:
        with os.fdopen(handle, "wb") as stream:
            with contextlib.suppress(FileNotFoundError):  # a rewrite keeps the file's mode, as open() would
                os.fchmod(stream.fileno(), os.stat(path).st_mode & 0o7777)
            stream.write(payload)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException as err:
        with contextlib.suppress(OSError):  # the folder may be gone or read-only by now
            temporary.unlink()
        if isinstance(err, OSError):  # name the target, not the temporary file (a failed write names none)
            err.filename = str(path)
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def atomic_write_json(path: Path, value: Any) -> None:
    """Strict JSON (NaN and Infinity are refused: strict parsers reject those tokens)."""
    atomic_write_bytes(path, (json.dumps(value, indent=2, allow_nan=False) + "\n").encode())


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def new_staging_folder(parent: Path, prefix: str) -> Path:
    """A new, empty folder in ``parent`` to fill and then ``publish_folder``; made as ``mkdir`` makes one
    (0777 less the umask; ``tempfile.mkdtemp`` would make it 0700 and the published folder with it)."""
    folder = parent / f"{prefix}{secrets.token_hex(8)}"
    folder.mkdir()
    return folder


def publish_folder(staging: Path, target: Path) -> None:
    """Publish a whole folder at once: fsync every file of ``staging``, rename it to ``target``, fsync
    the parent. For files too big to hold in memory (the decode cache writes its images into a
    memory-mapped file in ``staging``), where ``atomic_write_bytes`` would need a second copy."""
    for path in staging.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    os.replace(staging, target)
    _fsync_folder(target.parent)
