"""Encoded images (JPEG/PNG bytes) to uint8 [N, 3, 32, 32], fast: one byte buffer, batched
threaded decoding straight into the output (which may be a memory-mapped cache file)."""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError, first_line
from ..model import IMAGE_SHAPE, NUM_CLASSES

DECODE_CHUNK = 2048  # images per decode task: amortises the per-call work, stays in the CPU cache
DECODE_THREADS_MAX = 4  # the decoders release the GIL; more threads than this gain nothing on 32x32 images
# torchvision 0.29 warns on every decode call that its decoders move to TorchCodec: thousands of
# identical lines per run from every process. The decoders work; keep the logs readable.
warnings.filterwarnings(
    "ignore",
    message="The image decoding and encoding capabilities of TorchVision are deprecated",
    category=DeprecationWarning,
)

Allocate = Callable[[int], np.ndarray]


def allocate_in_memory(rows: int) -> np.ndarray:
    return np.empty((rows, *IMAGE_SHAPE), dtype=np.uint8)


@dataclass(frozen=True)
class RowNames:
    """How an error names a bad image and says what to do: a row of a file, or a file of its own."""

    where: str  # the file or split the rows come from
    files: Sequence[Path] | None = None  # one file per row (an image folder)

    def name(self, row: int) -> str:
        return str(self.files[row]) if self.files is not None else f"{self.where}: row {row}"

    @property
    def fix(self) -> str:
        return "replace or delete that file" if self.files is not None else "re-encode that row or remove it"


def pack(encoded: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Byte strings -> one uint8 buffer plus int64 row offsets (row i is ``packed[offsets[i]:offsets[i + 1]]``)."""
    lengths = np.fromiter((len(b) for b in encoded), dtype=np.int64, count=len(encoded))
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return np.frombuffer(bytearray().join(encoded), dtype=np.uint8), offsets


def decode_images(encoded: Sequence[bytes], where: str | RowNames) -> np.ndarray:
    """Decode JPEG/PNG bytes to uint8 [N, 3, 32, 32].

    Anything that is not a 32x32 RGB image is an error naming its row (or file).
    """
    packed, offsets = pack(encoded)
    out = allocate_in_memory(len(encoded))
    decode_packed(packed, offsets, out, where)
    return out


def decode_threads() -> int:
    """Threads for a cold decode: the cores this process may use (a Ray actor's other
    processes wait on the cache lock meanwhile), at most DECODE_THREADS_MAX."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, DECODE_THREADS_MAX))


def decode_packed(packed: np.ndarray, offsets: np.ndarray, out: np.ndarray, where: str | RowNames) -> None:
    """Decode row i = ``packed[offsets[i]:offsets[i + 1]]`` into ``out[i]`` (uint8 [N, 3, 32, 32]).

    No per-row Python objects beyond one tensor view each: the encoded bytes stay in one
    buffer, JPEG chunks go through torchvision's batched decoder in a few threads, and each
    chunk is stacked straight into its slice of ``out`` (which may be the cache file itself).
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    rows = where if isinstance(where, RowNames) else RowNames(where)
    n = len(offsets) - 1
    if n == 0:
        return
    lengths = np.diff(offsets)
    heads = offsets[:-1][lengths >= 2]
    is_jpeg = np.zeros(n, dtype=bool)
    is_jpeg[lengths >= 2] = (packed[heads] == 0xFF) & (packed[heads + 1] == 0xD8)
    flat = torch.from_numpy(packed[offsets[0] : offsets[-1]])
    pieces = torch.split(flat, lengths.tolist())
    target = torch.from_numpy(out)

    def decode_chunk(start: int) -> None:
        stop = min(start + DECODE_CHUNK, n)
        chunk = list(pieces[start:stop])
        images = None
        if is_jpeg[start:stop].all():
            try:
                images = decode_jpeg(chunk, mode=ImageReadMode.UNCHANGED)
            except RuntimeError:
                images = None  # find the bad row one by one below
        if images is None:
            images = [_decode_one(piece, start + i, rows) for i, piece in enumerate(chunk)]
        for i, image in enumerate(images):
            if image.shape != IMAGE_SHAPE:
                c, h, w = image.shape
                raise DataError(
                    f"{rows.name(start + i)} is a {h}x{w} image with {c} channel(s); "
                    "this app needs 32x32 RGB images (CIFAR-10 shaped)"
                )
        torch.stack(images, out=target[start:stop])

    starts = range(0, n, DECODE_CHUNK)
    threads = min(decode_threads(), len(starts))
    if threads == 1:
        for start in starts:
            decode_chunk(start)
        return
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(threads, thread_name_prefix="fedcifar-decode")
    try:
        for future in [pool.submit(decode_chunk, start) for start in starts]:
            future.result()  # in row order, so the first bad row is the one reported
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _decode_one(piece: torch.Tensor, row: int, rows: RowNames) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image

    try:
        return decode_image(piece, mode=ImageReadMode.UNCHANGED)
    except (RuntimeError, ValueError) as err:
        raise DataError(f"{rows.name(row)} is not a readable image ({_reason(err)}); {rows.fix}") from None


def _reason(err: Exception) -> str:
    """torchvision's message without its C++ location: 'decode_jpeg, .../decode_jpeg.cpp:171, Image is ...'."""
    return re.sub(r"^.*\.(?:cpp|h):\d+,\s*", "", first_line(err)) or type(err).__name__


def check_labels(labels: np.ndarray, where: str) -> np.ndarray:
    """Labels as int64, each in 0..NUM_CLASSES-1, or an error naming the first bad row."""
    if labels.dtype.kind not in "iuf":
        raise DataError(
            f"{where}: labels are {labels.dtype} values; this app needs integer labels 0..{NUM_CLASSES - 1}"
        )
    bad = np.flatnonzero((labels < 0) | (labels >= NUM_CLASSES))
    if bad.size:
        raise DataError(
            f"{where}: label {labels[bad[0]]} at row {bad[0]} is outside 0..{NUM_CLASSES - 1}; "
            f"this app trains a {NUM_CLASSES}-class classifier"
        )
    return labels.astype(np.int64)
