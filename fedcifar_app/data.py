"""Datasets as uint8 tensors: sources, decoding once, an on-disk cache, partitioning.

Every image is decoded once per machine, not once per epoch: a split is decoded in
batches (torchvision's JPEG/PNG decoders), checked (32x32 RGB, labels 0..9) and stored
as ``.npy`` files in a cache folder that every process of the machine shares (Ray
actors are separate processes). Later loads memory-map those files, so a node's
partition costs one fancy-index copy, and normalisation happens per batch on the tensor.

Cache entries are keyed on what defines the data (the source, its files' sizes and
modification times, the split), so an edited dataset is decoded again; partitions are
keyed on every value that defines them (partitioner, alpha, seed, number of partitions,
validation fraction). Flower-free.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import hashlib
import json
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import SYNTHETIC_DATASET, NodeData, Partitioner, RunConfig
from .model import IMAGE_SHAPE, NUM_CLASSES
from .seeds import derive_seed

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
CACHE_FORMAT = 1  # bump when the stored layout changes, so old entries are never misread
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
SPLITS = ("train", "test")


class DataError(ValueError):
    """Data that cannot be used; the message names the file or key and the fix."""


@dataclass(frozen=True)
class ImageTensors:
    """Images as uint8 [N, 3, 32, 32] and labels as int64 [N]."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class NodeSplits:
    """One node's data: what it trains on and what it validates on."""

    train: ImageTensors
    val: ImageTensors


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> float in [-1, 1], the tutorial's Normalize((0.5,)*3, (0.5,)*3), on a whole batch."""
    return images.float().div_(127.5).sub_(1.0)


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class LocalFolder:
    """A folder of parquet files, an image folder, or a ``save_to_disk`` folder."""

    path: Path
    kind: str  # "parquet" | "imagefolder" | "save_to_disk"


@dataclass(frozen=True)
class HubDataset:
    hub_id: str


@dataclass(frozen=True)
class SyntheticDataset:
    pass


DataSource = LocalFolder | HubDataset | SyntheticDataset


def resolve_source(name: str, key: str = "dataset") -> DataSource:
    """Classify a ``dataset`` value; a path that is not there is an error, not a hub id."""
    if name == SYNTHETIC_DATASET:
        return SyntheticDataset()
    path = Path(name).expanduser()
    looks_like_path = name.startswith(("/", "./", "../", "~")) or os.sep + os.sep in name
    if not path.exists():
        if looks_like_path or name.count("/") > 1:
            raise DataError(
                f"{key}={name!r}: no such folder (resolved to {path.resolve()}); "
                "pass an existing folder, a Hugging Face hub id or 'synthetic'"
            )
        return HubDataset(name)
    path = path.resolve()
    if not path.is_dir():
        raise DataError(f"{key}={name!r} is a file; pass the folder that holds the train/test splits")
    if (path / "dataset_dict.json").exists():
        return LocalFolder(path, "save_to_disk")
    if any(path.rglob("*.parquet")):
        return LocalFolder(path, "parquet")
    if any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.rglob("*")):
        return LocalFolder(path, "imagefolder")
    raise DataError(
        f"{key}={name!r} holds no parquet files, images or save_to_disk dataset: "
        "pass a folder like ../shared/data/cifar10 (train-*.parquet and test-*.parquet)"
    )


def _split_files(folder: LocalFolder, split: str) -> list[Path]:
    """The files of one split, by the Hugging Face naming conventions."""
    root = folder.path
    if folder.kind == "save_to_disk":
        files = sorted(p for p in (root / split).rglob("*") if p.is_file())
    elif folder.kind == "parquet":
        files = sorted(p for p in root.rglob("*.parquet") if _split_of(p.relative_to(root)) == split)
    else:
        files = sorted(p for p in (root / split).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return files


def _split_of(relative: Path) -> str | None:
    """'train-00000-of-00001.parquet', 'test.parquet', 'train/x.parquet', 'data/test-0.parquet'."""
    stem = relative.name.split("-")[0].split(".")[0].split("_")[0]
    if stem in SPLITS:
        return stem
    for part in relative.parts[:-1]:
        if part in SPLITS:
            return part
    return None


def _fingerprint(source: DataSource, split: str, key: str) -> str:
    """What defines a split's decoded tensors; any change to its files changes it."""
    if isinstance(source, SyntheticDataset):
        identity = [SYNTHETIC_DATASET, split]
    elif isinstance(source, HubDataset):
        identity = ["hub", source.hub_id, split]
    else:
        files = _split_files(source, split)
        if not files:
            raise DataError(
                f"{key}={str(source.path)!r} has no {split!r} split: expected {split}-*.parquet files, "
                f"a {split}/ folder of images, or a save_to_disk folder with {split}/"
            )
        identity = [str(source.path), split] + [
            f"{f.relative_to(source.path)}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files
        ]
    identity.insert(0, f"format-{CACHE_FORMAT}")
    return hashlib.sha256("\n".join(identity).encode()).hexdigest()[:32]


# --------------------------------------------------------------------------- decoding

DECODE_CHUNK = 2048  # images per decode task: amortises the per-call work, stays in the CPU cache
DECODE_THREADS_MAX = 4  # the decoders release the GIL; more threads than this gain nothing on 32x32 images
# torchvision 0.29 warns on every decode call that its decoders move to TorchCodec: thousands of
# identical lines per run from every process. The decoders work; keep the logs readable.
warnings.filterwarnings(
    "ignore",
    message="The image decoding and encoding capabilities of TorchVision are deprecated",
    category=DeprecationWarning,
)


def decode_images(encoded: Sequence[bytes], where: str) -> np.ndarray:
    """Decode JPEG/PNG bytes to uint8 [N, 3, 32, 32].

    Anything that is not a 32x32 RGB image is an error naming its row.
    """
    lengths = np.fromiter((len(b) for b in encoded), dtype=np.int64, count=len(encoded))
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    packed = np.frombuffer(bytearray().join(encoded), dtype=np.uint8)
    out = np.empty((len(encoded), *IMAGE_SHAPE), dtype=np.uint8)
    _decode_packed(packed, offsets, out, where)
    return out


def _decode_threads() -> int:
    """Threads for a cold decode: the cores this process may use (a Ray actor's other
    processes wait on the cache lock meanwhile), at most DECODE_THREADS_MAX."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, DECODE_THREADS_MAX))


def _decode_packed(packed: np.ndarray, offsets: np.ndarray, out: np.ndarray, where: str) -> None:
    """Decode row i = ``packed[offsets[i]:offsets[i + 1]]`` into ``out[i]`` (uint8 [N, 3, 32, 32]).

    No per-row Python objects beyond one tensor view each: the encoded bytes stay in one
    buffer, JPEG chunks go through torchvision's batched decoder in a few threads, and each
    chunk is stacked straight into its slice of ``out`` (which may be the cache file itself).
    """
    from torchvision.io import ImageReadMode, decode_jpeg

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
            images = [_decode_one(piece, start + i, where) for i, piece in enumerate(chunk)]
        for i, image in enumerate(images):
            if image.shape != IMAGE_SHAPE:
                c, h, w = image.shape
                raise DataError(
                    f"{where}: row {start + i} is a {h}x{w} image with {c} channel(s); "
                    "this app needs 32x32 RGB images (CIFAR-10 shaped)"
                )
        torch.stack(images, out=target[start:stop])

    starts = range(0, n, DECODE_CHUNK)
    threads = min(_decode_threads(), len(starts))
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


def _decode_one(piece: torch.Tensor, row: int, where: str) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image

    try:
        return decode_image(piece, mode=ImageReadMode.UNCHANGED)
    except (RuntimeError, ValueError) as err:
        raise DataError(f"{where}: row {row} is not a readable image ({err}); replace or remove it") from None


def _check_labels(labels: np.ndarray, where: str) -> np.ndarray:
    bad = np.flatnonzero((labels < 0) | (labels >= NUM_CLASSES))
    if bad.size:
        raise DataError(
            f"{where}: label {labels[bad[0]]} at row {bad[0]} is outside 0..{NUM_CLASSES - 1}; "
            f"this app trains a {NUM_CLASSES}-class classifier"
        )
    return labels.astype(np.int64)


Allocate = Callable[[int], np.ndarray]


def _allocate_in_memory(rows: int) -> np.ndarray:
    return np.empty((rows, *IMAGE_SHAPE), dtype=np.uint8)


def _packed_images(table, file: Path) -> tuple[np.ndarray, np.ndarray]:
    """The 'img' column as one byte buffer plus row offsets, straight from Arrow's buffers."""
    import pyarrow as pa

    not_images = DataError(f"{file}: column 'img' does not hold encoded images (JPEG/PNG bytes)")
    column = table.column("img").combine_chunks()
    try:
        values = column.field("bytes") if pa.types.is_struct(column.type) else column
    except KeyError:
        raise not_images from None
    if column.null_count or values.null_count:
        raise not_images
    if pa.types.is_binary(values.type) or pa.types.is_large_binary(values.type):
        offset_type = np.int32 if pa.types.is_binary(values.type) else np.int64
        _, offsets_buffer, data_buffer = values.buffers()
        offsets = np.frombuffer(offsets_buffer, dtype=offset_type)[values.offset : values.offset + len(values) + 1]
        offsets = offsets.astype(np.int64)
        data = np.frombuffer(data_buffer, dtype=np.uint8) if data_buffer is not None else np.empty(0, np.uint8)
        packed = data[offsets[0] : offsets[-1]].copy()  # writable, and the table can go
        return packed, offsets - offsets[0]
    encoded = values.to_pylist()  # other binary layouts (views, fixed size): the slow general way
    if not all(isinstance(b, bytes) for b in encoded):
        raise not_images
    lengths = np.fromiter((len(b) for b in encoded), dtype=np.int64, count=len(encoded))
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return np.frombuffer(bytearray().join(encoded), dtype=np.uint8), offsets


def _label_array(table) -> np.ndarray:
    import pyarrow as pa

    column = table.column("label")
    if column.null_count == 0 and pa.types.is_integer(column.type):
        return column.to_numpy()
    return np.asarray(column.to_pylist())


def _read_parquet_split(files: list[Path], allocate: Allocate = _allocate_in_memory) -> tuple[np.ndarray, np.ndarray]:
    """Every file of a split decoded into one array from ``allocate`` (which may map the cache file)."""
    import pyarrow.parquet as pq

    tables = []
    for file in files:
        try:
            table = pq.read_table(file)
        except Exception as err:  # pyarrow raises several types for a damaged file
            raise DataError(f"cannot read {file}: {err}; re-create or replace this parquet file") from None
        missing = [c for c in ("img", "label") if c not in table.column_names]
        if missing:
            raise DataError(
                f"{file} lacks column(s) {', '.join(missing)} (has {', '.join(table.column_names)}): "
                "this app needs 'img' (image bytes) and 'label' (0..9), the uoft-cs/cifar10 schema"
            )
        tables.append(table)
    images = allocate(sum(table.num_rows for table in tables))
    labels, start = [], 0
    for index, file in enumerate(files):
        table, tables[index] = tables[index], None  # each table goes once its bytes are packed
        packed, offsets = _packed_images(table, file)
        rows = len(offsets) - 1
        _decode_packed(packed, offsets, images[start : start + rows], str(file))
        labels.append(_check_labels(_label_array(table), str(file)))
        start += rows
    return images, np.concatenate(labels) if labels else np.empty(0, dtype=np.int64)


def _read_image_folder_split(root: Path, files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """<root>/<split>/<class>/<image>: labels from the sorted class folder names (imagefolder's rule)."""
    classes = sorted({f.parent.name for f in files})
    if len(classes) > NUM_CLASSES:
        raise DataError(f"{root} has {len(classes)} class folders; this app needs at most {NUM_CLASSES}")
    label_of = {name: i for i, name in enumerate(classes)}
    images = decode_images([f.read_bytes() for f in files], str(files[0].parent.parent))
    return images, np.array([label_of[f.parent.name] for f in files], dtype=np.int64)


def _read_hf_split(source: DataSource, split: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """Hub ids and save_to_disk folders go through Hugging Face ``datasets``."""
    import datasets

    try:
        if isinstance(source, HubDataset):
            dataset_dict = datasets.load_dataset(source.hub_id)
        else:
            dataset_dict = datasets.load_from_disk(str(source.path))
    except Exception as err:
        name = source.hub_id if isinstance(source, HubDataset) else str(source.path)
        raise DataError(
            f"{key}={name!r} could not be loaded ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            "without internet access pass a local folder, e.g. dataset='../shared/data/cifar10'"
        ) from None
    if split not in dataset_dict:
        raise DataError(f"{key}: the dataset has splits {list(dataset_dict)} but no {split!r} split")
    dataset = dataset_dict[split]
    if "img" not in dataset.column_names and "image" in dataset.column_names:
        dataset = dataset.rename_column("image", "img")
    missing = [c for c in ("img", "label") if c not in dataset.column_names]
    if missing:
        raise DataError(
            f"{key}: split {split!r} lacks column(s) {', '.join(missing)} (has {', '.join(dataset.column_names)}); "
            "this app needs 'img' and 'label', the uoft-cs/cifar10 schema"
        )
    dataset = dataset.cast_column("img", datasets.Image(decode=False))
    encoded = [cell["bytes"] or Path(cell["path"]).read_bytes() for cell in dataset["img"]]
    where = f"{key} split {split!r}"
    return decode_images(encoded, where), _check_labels(np.asarray(dataset["label"]), where)


def synthetic_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """A small learnable CIFAR-shaped set: a fixed smooth pattern per class plus noise.

    Deterministic (fixed seeds, independent of the run's seed) so every process and
    machine builds the same data without files or network.
    """
    per_class = {"train": 200, "test": 50}[split]
    prototypes_rng = np.random.default_rng(2024)
    coarse = prototypes_rng.uniform(30, 225, size=(NUM_CLASSES, 3, 4, 4))
    prototypes = coarse.repeat(8, axis=2).repeat(8, axis=3)  # 4x4 blocks -> 32x32
    rng = np.random.default_rng({"train": 1, "test": 2}[split])
    labels = np.tile(np.arange(NUM_CLASSES), per_class)
    noise = rng.normal(0, 40, size=(len(labels), *IMAGE_SHAPE))
    images = np.clip(prototypes[labels] + noise, 0, 255).astype(np.uint8)
    return images, labels.astype(np.int64)


# --------------------------------------------------------------------------- the cache


def cache_root() -> Path:
    """$FEDCIFAR_CACHE_DIR, else $XDG_CACHE_HOME/fedcifar_app, else ~/.cache/fedcifar_app."""
    if env := os.environ.get("FEDCIFAR_CACHE_DIR"):
        return Path(env).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "fedcifar_app"


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


def _decode_split(
    source: DataSource, split: str, key: str, allocate: Allocate = _allocate_in_memory
) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(source, SyntheticDataset):
        return synthetic_split(split)
    if isinstance(source, LocalFolder) and source.kind == "parquet":
        return _read_parquet_split(_split_files(source, split), allocate)
    if isinstance(source, LocalFolder) and source.kind == "imagefolder":
        return _read_image_folder_split(source.path, _split_files(source, split))
    return _read_hf_split(source, split, key)


def load_split(dataset: str, split: str, key: str = "dataset") -> ImageTensors:
    """A whole split as tensors, decoded once per machine and memory-mapped afterwards."""
    source = resolve_source(dataset, key)
    fingerprint = _fingerprint(source, split, key)
    images, labels = _cached_arrays(source, split, key, fingerprint)
    return ImageTensors(torch.from_numpy(images), torch.from_numpy(labels))


@functools.lru_cache(maxsize=8)
def _cached_arrays(source: DataSource, split: str, key: str, fingerprint: str) -> tuple[np.ndarray, np.ndarray]:
    """Per process: the memory-mapped arrays of one cache entry (keyed by its fingerprint)."""
    if isinstance(source, SyntheticDataset):
        return synthetic_split(split)  # cheaper to build than to read back
    entry = cache_root() / fingerprint
    if not (entry / "meta.json").exists():
        with _exclusive(cache_root() / f"{fingerprint}.lock"):
            if not (entry / "meta.json").exists():
                _write_entry(entry, source, split, key)
    # Copy-on-write map: torch wants writable memory; pages stay shared and nothing writes back.
    return np.load(entry / "images.npy", mmap_mode="c"), np.load(entry / "labels.npy")


def _write_entry(entry: Path, source: DataSource, split: str, key: str) -> None:
    """Decode and write to a temporary folder, then rename: readers never see half an entry.

    Parquet splits decode straight into the memory-mapped ``images.npy`` (no second copy
    of the split in memory, no separate write pass); the other sources are saved after.
    """
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    images_path = staging / "images.npy"

    def allocate_in_file(rows: int) -> np.ndarray:
        if rows == 0:
            return _allocate_in_memory(0)
        return np.lib.format.open_memmap(images_path, mode="w+", dtype=np.uint8, shape=(rows, *IMAGE_SHAPE))

    try:
        images, labels = _decode_split(source, split, key, allocate_in_file)
        if not isinstance(images, np.memmap):
            np.save(images_path, images)
        del images  # unmaps; the page cache holds the data for the readers that follow
        np.save(staging / "labels.npy", labels)
        described = source.hub_id if isinstance(source, HubDataset) else str(getattr(source, "path", source))
        (staging / "meta.json").write_text(
            json.dumps({"source": described, "split": split, "rows": int(len(labels)), "format": CACHE_FORMAT})
        )
        os.replace(staging, entry)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def class_names(dataset: str) -> tuple[str, ...]:
    """Class names for plots: CIFAR-10's, or an image folder's class folder names."""
    source = resolve_source(dataset)
    if isinstance(source, LocalFolder) and source.kind == "imagefolder":
        return tuple(sorted({f.parent.name for f in _split_files(source, "train")}))
    return CIFAR10_CLASSES


# --------------------------------------------------------------------------- partitions


@functools.lru_cache(maxsize=8)
def _partitioner(
    dataset: str, fingerprint: str, partitioner: Partitioner, num_partitions: int, alpha: float, seed: int
):
    """flwr-datasets' Dirichlet partitioner over the split's labels, one per process per set of
    defining values (IID partitions are computed directly: ``_iid_rows``).

    It sees only labels and row numbers, never images, so partitioning 1,000 ways stays cheap.
    """
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner

    labels = load_split(dataset, "train").labels.numpy()
    table = Dataset.from_dict({"label": labels, "row": np.arange(len(labels))})
    splitter = DirichletPartitioner(
        num_partitions=num_partitions,
        partition_by="label",
        alpha=alpha,
        min_partition_size=2,  # one training and one validation sample at least
        self_balancing=False,
        shuffle=True,
        seed=seed,
    )
    # Arrow format: `dataset["label"]` (Dirichlet's targets) and our row lookups read whole columns.
    # Unformatted, datasets 4 hands back a lazy Column that numpy walks row by row: ~2 s per 5,000 rows.
    splitter.dataset = table.with_format("arrow")
    return splitter


@functools.lru_cache(maxsize=8)
def _iid_permutation(num_samples: int, seed: int) -> np.ndarray:
    """``Dataset.shuffle(seed=seed)``'s row order: ``np.random.default_rng(seed).permutation``."""
    return np.random.default_rng(seed).permutation(num_samples)


def _iid_rows(num_samples: int, num_partitions: int, seed: int, partition_id: int) -> np.ndarray:
    """flwr-datasets' IidPartitioner on the shuffled rows, without importing ``datasets`` (~2 s of
    CPU and ~115 MB in every process) or building a Dataset per node (~14 ms each at 1,000 nodes):
    it is ``Dataset.shard(num_partitions, partition_id, contiguous=True)`` of the shuffled rows.
    tests/test_data_cache.py checks the rows against flwr-datasets' own."""
    size, extra = divmod(num_samples, num_partitions)
    start = size * partition_id + min(partition_id, extra)
    stop = start + size + (1 if partition_id < extra else 0)
    return _iid_permutation(num_samples, seed)[start:stop].copy()


def _partition_rows(config_key: tuple, partition_id: int, num_samples: int) -> np.ndarray:
    """Row indices of one partition; Dirichlet's failure becomes a message that says the fix."""
    _, _, partitioner, num_partitions, _, seed = config_key
    if partitioner is Partitioner.IID:
        return _iid_rows(num_samples, num_partitions, seed, partition_id)
    try:
        with warnings.catch_warnings():
            # flwr-datasets warns on every retry with the whole alpha vector (1,000 floats for 1,000
            # nodes); the outcome, success or the DataError below, is what the user needs.
            warnings.simplefilter("ignore", UserWarning)
            return _partitioner(*config_key).load_partition(partition_id).with_format("arrow")["row"].to_numpy()
    except ValueError as err:
        _, _, _, num_partitions, alpha, _ = config_key
        raise DataError(
            f"partitioner='dirichlet' with dirichlet-alpha={alpha} cannot give each of {num_partitions} nodes "
            f"2 or more of the {num_samples} samples ({err}); raise dirichlet-alpha or use fewer nodes"
        ) from None


def split_train_val(data: ImageTensors, val_fraction: float, seed: int, where: str) -> NodeSplits:
    """Shuffle with ``seed`` and hold out ``val_fraction`` (at least one sample) for validation."""
    n = len(data)
    n_val = max(1, round(n * val_fraction))
    if n - n_val < 1:
        raise DataError(
            f"{where} has {n} sample(s): too few to split into training and validation "
            f"(val-fraction={val_fraction}); use fewer nodes or more data"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val_rows, train_rows = order[:n_val], order[n_val:]
    return NodeSplits(
        train=ImageTensors(data.images.index_select(0, train_rows), data.labels.index_select(0, train_rows)),
        val=ImageTensors(data.images.index_select(0, val_rows), data.labels.index_select(0, val_rows)),
    )


def load_node_data(config: RunConfig, node: NodeData) -> NodeSplits:
    """The node's train/validation tensors: its share of ``dataset`` or its own ``data-path``."""
    return _load_node_data(
        config.dataset,
        config.partitioner,
        config.dirichlet_alpha,
        config.seed,
        config.val_fraction,
        node,
        _node_fingerprint(config.dataset, node),
    )


def _node_fingerprint(dataset: str, node: NodeData) -> str:
    if node.data_path is not None:
        return _fingerprint(resolve_source(node.data_path, "node config data-path"), "train", "data-path")
    return _fingerprint(resolve_source(dataset), "train", "dataset")


@functools.lru_cache(maxsize=32)
def _load_node_data(
    dataset: str,
    partitioner: Partitioner,
    alpha: float,
    seed: int,
    val_fraction: float,
    node: NodeData,
    fingerprint: str,
) -> NodeSplits:
    """Cached per process on every value that defines the node's data (the files' fingerprint too)."""
    if node.data_path is not None:
        own = load_split(node.data_path, "train", key="node config data-path")
        return split_train_val(own, val_fraction, derive_seed(seed, "val-split"), f"data-path={node.data_path}")
    full = load_split(dataset, "train")
    where = f"partition {node.partition_id} of {node.num_partitions}"
    config_key = (dataset, fingerprint, partitioner, node.num_partitions, alpha, seed)
    if node.num_partitions > len(full):
        rows = torch.empty(0, dtype=torch.int64)  # too thin for the partitioner to even shard
    else:
        rows = torch.from_numpy(_partition_rows(config_key, node.partition_id, len(full)))
    if len(rows) == 0:
        raise DataError(
            f"{where} is empty ({len(full)} training samples for {node.num_partitions} nodes); "
            "use fewer nodes or more data"
        )
    # index_select copies whole rows; `tensor[rows]` gathers byte by byte (7x slower on uint8 images).
    part = ImageTensors(full.images.index_select(0, rows), full.labels.index_select(0, rows))
    return split_train_val(part, val_fraction, derive_seed(seed, "val-split", node.partition_id), where)


def check_dataset(dataset: str) -> None:
    """Fail fast on a dataset value that cannot work (missing folder, split or columns)."""
    source = resolve_source(dataset)
    if isinstance(source, LocalFolder):
        for split in SPLITS:
            _fingerprint(source, split, "dataset")


# --------------------------------------------------------------------------- cache CLI


def cache_main(argv: Sequence[str] | None = None) -> int:
    """``fedcifar-cache info|clear``: where decoded datasets live, how big they are, and removal."""
    parser = argparse.ArgumentParser(prog="fedcifar-cache", description=cache_main.__doc__)
    parser.add_argument("action", choices=("info", "clear"))
    args = parser.parse_args(argv)
    root = cache_root()
    entries = sorted(p for p in root.glob("*") if (p / "meta.json").exists()) if root.exists() else []
    if args.action == "info":
        total = 0
        print(f"cache folder: {root} (set FEDCIFAR_CACHE_DIR to move it)")
        for entry in entries:
            size = sum(f.stat().st_size for f in entry.iterdir())
            total += size
            meta = json.loads((entry / "meta.json").read_text())
            print(
                f"  {entry.name}  {size / 2**20:8.1f} MiB  {meta['split']:5s}  {meta['rows']:6d} rows  {meta['source']}"
            )
        print(f"{len(entries)} entries, {total / 2**20:.1f} MiB")
    else:
        if root.exists():
            shutil.rmtree(root)
        print(f"removed {root} ({len(entries)} entries)")
    return 0


if __name__ == "__main__":
    sys.exit(cache_main())
