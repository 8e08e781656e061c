"""Atomic file writes: the one writer every part of the app uses. Flower-free, torch-free.

A reader (a person, a resuming run, a plot refresh, a second process) sees the old file or
the new one, never half of one, and a crash leaves no debris beside the target.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write a temporary file in the target's folder, fsync it, rename it over the target, fsync the folder
    (so after a crash the target is the old file or the new one, never cut short)."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(payload)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
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


def publish_folder(staging: Path, target: Path) -> None:
    """Publish a whole folder at once: fsync every file of ``staging``, rename it to ``target``, fsync
    the parent. For files too big to hold in memory (the decode cache writes its images into a
    memory-mapped file in ``staging``), where ``atomic_write_bytes`` would need a second copy."""
    for path in staging.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    os.replace(staging, target)
    _fsync_folder(target.parent)
