"""The decode-once cache: every split is decoded once per machine and memory-mapped afterwards.

An entry is a folder ``<cache_root>/<fingerprint>/`` holding ``images.npy`` (uint8 [N, 3, 32, 32]),
``labels.npy`` (int64 [N]) and ``meta.json``, shared by every process of the machine (Ray actors
are separate processes). The fingerprint covers what defines the data (the source, its files'
sizes and modification times, the split), so an edited dataset is decoded again. One process
decodes an entry (a file lock) while the others wait and then map its result. The cache is the
app's own: a damaged entry (cut short, wrong size, unreadable) is logged in one line, removed
and decoded again, never served.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ..config import SYNTHETIC_DATASET
from ..errors import DataError, first_line
from ..files import new_staging_folder, publish_folder, write_problem
from ..logs import APP_LOGGER
from ..model import IMAGE_SHAPE
from .decoding import allocate_in_memory
from .readers import read_split, synthetic_split
from .sources import DataSource, HubDataset, SyntheticDataset, describe, required_split_files, resolve_source
from .tensors import ImageTensors

CACHE_FORMAT = 1  # bump when the stored layout changes, so old entries are never misread
logger = logging.getLogger(APP_LOGGER)


def cache_root() -> Path:
    """$FEDCIFAR_CACHE_DIR, else $XDG_CACHE_HOME/fedcifar_app, else ~/.cache/fedcifar_app."""
    if env := os.environ.get("FEDCIFAR_CACHE_DIR"):
        return Path(env).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "fedcifar_app"


def cache_entries(root: Path) -> list[Path]:
    """The complete entries under ``root`` (staging and damaged folders start with a dot)."""
    if not root.exists():
        return []
    return sorted(p for p in root.iterdir() if not p.name.startswith(".") and (p / "meta.json").exists())


def split_fingerprint(source: DataSource, split: str, key: str) -> str:
    """What defines a split's decoded tensors; any change to its files changes it."""
    if isinstance(source, SyntheticDataset):
        identity = [SYNTHETIC_DATASET, split]
    elif isinstance(source, HubDataset):
        identity = ["hub", source.hub_id, split]
    else:
        files = required_split_files(source, split, key)
        identity = [str(source.path), split] + [
            f"{f.relative_to(source.path)}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files
        ]
    identity.insert(0, f"format-{CACHE_FORMAT}")
    return hashlib.sha256("\n".join(identity).encode()).hexdigest()[:32]


def load_split(dataset: str, split: str, key: str = "dataset") -> ImageTensors:
    """A whole split as tensors, decoded once per machine and memory-mapped afterwards."""
    source = resolve_source(dataset, key)
    images, labels = _cached_arrays(source, split, key, split_fingerprint(source, split, key))
    return ImageTensors(torch.from_numpy(images), torch.from_numpy(labels))


@functools.lru_cache(maxsize=8)
def _cached_arrays(source: DataSource, split: str, key: str, fingerprint: str) -> tuple[np.ndarray, np.ndarray]:
    """Per process: the memory-mapped arrays of one cache entry (keyed by its fingerprint)."""
    if isinstance(source, SyntheticDataset):
        return synthetic_split(split)  # cheaper to build than to read back
    entry = cache_root() / fingerprint
    with contextlib.suppress(_Unusable):
        return _open_entry(entry)
    try:
        with _exclusive(cache_root() / f"{fingerprint}.lock"):
            try:
                return _open_entry(entry)  # another process wrote (or rebuilt) it while this one waited
            except _Missing:
                pass
            except _Damaged as damage:
                logger.warning(
                    "decode cache entry %s is damaged (%s); removing it and decoding %s split %r again",
                    entry,
                    damage,
                    describe(source),
                    split,
                )
                _discard(entry)
            _write_entry(entry, source, split, key)
    except OSError as err:  # every read of the user's files names its file; what is left is the cache folder
        what, fix = write_problem(err)
        raise DataError(
            f"the decode cache folder {cache_root()} cannot be written: {what}; {fix}, "
            "or set FEDCIFAR_CACHE_DIR to a writable folder with free space"
        ) from None
    try:
        return _open_entry(entry)
    except _Unusable as problem:
        raise DataError(
            f"the decode cache {entry} cannot be read back right after writing it ({problem}); "
            "set FEDCIFAR_CACHE_DIR to a folder on a healthy disk with free space"
        ) from None


def clear_split_memo() -> None:
    """Forget this process's mapped entries (``fedcifar_app.data.reset_process_caches`` calls it)."""
    _cached_arrays.cache_clear()


class _Unusable(Exception):
    """The entry cannot be served as it is."""


class _Missing(_Unusable):
    """No entry yet: decode."""


class _Damaged(_Unusable):
    """An entry is there but cut short, the wrong size or unreadable: rebuild it."""


def _open_entry(entry: Path) -> tuple[np.ndarray, np.ndarray]:
    """Map a complete entry, checking what can be checked without reading the pixels: meta.json,
    the .npy headers, the shapes against meta's row count, and images.npy's exact size."""
    if not entry.exists():
        raise _Missing(str(entry))
    try:
        meta = json.loads((entry / "meta.json").read_text())
        rows = int(meta["rows"])
        # Copy-on-write map: torch wants writable memory; pages stay shared and nothing writes back.
        images = np.load(entry / "images.npy", mmap_mode="c")
        labels = np.load(entry / "labels.npy")
    except (OSError, ValueError, EOFError, KeyError, TypeError) as err:
        raise _Damaged(f"{type(err).__name__}: {first_line(err)}") from None
    if images.dtype != np.uint8 or images.shape != (rows, *IMAGE_SHAPE):
        raise _Damaged(f"images.npy holds {images.dtype} {images.shape}, meta.json says {rows} rows")
    if labels.dtype != np.int64 or labels.shape != (rows,):
        raise _Damaged(f"labels.npy holds {labels.dtype} {labels.shape}, meta.json says {rows} rows")
    expected_size = images.offset + images.nbytes if isinstance(images, np.memmap) else None
    actual_size = (entry / "images.npy").stat().st_size
    if expected_size is not None and actual_size != expected_size:
        raise _Damaged(f"images.npy is {actual_size} bytes, its header says {expected_size}")
    return images, labels


def _discard(entry: Path) -> None:
    """Move a damaged entry out of the way, then delete it (processes that mapped it keep their pages)."""
    graveyard = Path(tempfile.mkdtemp(prefix=f".{entry.name}.damaged.", dir=entry.parent))
    os.replace(entry, graveyard / "entry")
    shutil.rmtree(graveyard, ignore_errors=True)


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """One decoder per entry across processes; the others wait and then read its result."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _reserve_blocks(path: Path) -> None:
    """Allocate the disk blocks of a (sparse) memory-mapped file now: on a full disk this is an OSError
    here, where writing the mapped pages later would be a SIGBUS that kills the process."""
    with open(path, "r+b") as handle:
        try:
            os.posix_fallocate(handle.fileno(), 0, os.fstat(handle.fileno()).st_size)
        except OSError as err:
            if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system without fallocate: map as is
                raise


def _write_entry(entry: Path, source: DataSource, split: str, key: str) -> None:
    """Decode into a staging folder, then publish it: readers never see half an entry.

    Parquet splits decode straight into the memory-mapped ``images.npy`` (no second copy
    of the split in memory, no separate write pass); the other sources are saved after.
    """
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = new_staging_folder(entry.parent, f".{entry.name}.")  # the entry gets the umask's mode, not 0700
    images_path = staging / "images.npy"

    def allocate_in_file(rows: int) -> np.ndarray:
        if rows == 0:
            return allocate_in_memory(0)
        images = np.lib.format.open_memmap(images_path, mode="w+", dtype=np.uint8, shape=(rows, *IMAGE_SHAPE))
        _reserve_blocks(images_path)
        return images

    try:
        images, labels = read_split(source, split, key, allocate_in_file)
        if not isinstance(images, np.memmap):
            np.save(images_path, images)
        del images  # unmaps; the page cache holds the data for the readers that follow
        np.save(staging / "labels.npy", labels)
        meta = {"source": describe(source), "split": split, "rows": int(len(labels)), "format": CACHE_FORMAT}
        (staging / "meta.json").write_text(json.dumps(meta))
        publish_folder(staging, entry)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
