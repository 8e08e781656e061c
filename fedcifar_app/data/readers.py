"""One split of a source read into arrays (uint8 images [N, 3, 32, 32], int64 labels), checked.

Parquet goes straight from Arrow's buffers to the decoder (no per-row Python bytes); image
folders and Hugging Face datasets go through ``decode_images``; the synthetic set is built.
A damaged user file is refused with one line naming it; nothing is skipped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DataError, first_line
from ..model import IMAGE_SHAPE, NUM_CLASSES
from .decoding import Allocate, RowNames, allocate_in_memory, check_labels, decode_images, decode_packed, pack
from .sources import DataSource, FolderKind, HubDataset, LocalFolder, SyntheticDataset, required_split_files


def read_split(
    source: DataSource, split: str, key: str, allocate: Allocate = allocate_in_memory
) -> tuple[np.ndarray, np.ndarray]:
    """Decode one split; parquet decodes into ``allocate``'s array (the cache may map a file there)."""
    if isinstance(source, SyntheticDataset):
        return synthetic_split(split)
    if isinstance(source, LocalFolder) and source.kind is FolderKind.PARQUET:
        return read_parquet_split(required_split_files(source, split, key), allocate)
    if isinstance(source, LocalFolder) and source.kind is FolderKind.IMAGE_FOLDER:
        return read_image_folder_split(source.path, required_split_files(source, split, key))
    return read_hf_split(source, split, key)


def read_parquet_split(files: list[Path], allocate: Allocate = allocate_in_memory) -> tuple[np.ndarray, np.ndarray]:
    """Every file of a split decoded into one array from ``allocate`` (which may map the cache file)."""
    import pyarrow.parquet as pq

    tables = []
    for file in files:
        try:
            table = pq.read_table(file)
        except Exception as err:  # pyarrow raises several types for a damaged file
            raise DataError(f"cannot read {file}: {first_line(err)}; re-create or replace this parquet file") from None
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
        decode_packed(packed, offsets, images[start : start + rows], str(file))
        labels.append(check_labels(_label_array(table, file), str(file)))
        start += rows
    return images, np.concatenate(labels) if labels else np.empty(0, dtype=np.int64)


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
    return pack(encoded)


def _label_array(table, file: Path) -> np.ndarray:
    import pyarrow as pa

    column = table.column("label")
    if column.null_count:
        raise DataError(f"{file}: column 'label' has {column.null_count} empty row(s); give every row a label 0..9")
    if pa.types.is_integer(column.type):
        return column.to_numpy()
    return np.asarray(column.to_pylist())


def read_image_folder_split(root: Path, files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """<root>/<split>/<class>/<image>: labels from the sorted class folder names (imagefolder's rule)."""
    classes = sorted({f.parent.name for f in files})
    if len(classes) > NUM_CLASSES:
        raise DataError(f"{root} has {len(classes)} class folders; this app needs at most {NUM_CLASSES}")
    label_of = {name: i for i, name in enumerate(classes)}
    encoded = []
    for file in files:
        try:
            encoded.append(file.read_bytes())
        except OSError as err:
            raise DataError(
                f"cannot read {file} ({err.strerror or err}); fix its permissions, replace or delete it"
            ) from None
    images = decode_images(encoded, RowNames(str(files[0].parent.parent), files))
    return images, np.array([label_of[f.parent.name] for f in files], dtype=np.int64)


def read_hf_split(source: HubDataset | LocalFolder, split: str, key: str) -> tuple[np.ndarray, np.ndarray]:
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
            f"{key}={name!r} could not be loaded ({type(err).__name__}: {first_line(err)}); "
            "without internet access pass a local folder, e.g. dataset='/path/to/cifar10'"
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
    where = f"{key} split {split!r}"
    encoded = [cell["bytes"] or _read_image_file(cell["path"], where) for cell in dataset["img"]]
    return decode_images(encoded, where), check_labels(np.asarray(dataset["label"]), where)


def _read_image_file(path: str | None, where: str) -> bytes:
    """An image a Hugging Face dataset stores by path rather than by bytes."""
    if path is None:
        raise DataError(f"{where}: an image has neither bytes nor a file path; rebuild the dataset")
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise DataError(f"{where}: cannot read image file {path} ({err}); restore it or rebuild the dataset") from None


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
