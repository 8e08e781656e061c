"""What a ``dataset`` value names: a local folder (parquet, image folder, save_to_disk), a hub id,
or the built-in synthetic set; and which files hold each split."""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from pathlib import Path

from ..config import SYNTHETIC_DATASET
from ..errors import DataError
from .tensors import CIFAR10_CLASSES

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
SPLITS = ("train", "test")


class FolderKind(str, enum.Enum):
    """How a local folder stores its splits (Hugging Face's names for the three layouts)."""

    PARQUET = "parquet"  # <root>/**/{train,test}-*.parquet
    IMAGE_FOLDER = "imagefolder"  # <root>/{train,test}/<class>/<image>
    SAVE_TO_DISK = "save_to_disk"  # datasets.DatasetDict.save_to_disk(<root>)


@dataclass(frozen=True)
class LocalFolder:
    """A folder of parquet files, an image folder, or a ``save_to_disk`` folder."""

    path: Path
    kind: FolderKind


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
        return LocalFolder(path, FolderKind.SAVE_TO_DISK)
    if any(path.rglob("*.parquet")):
        return LocalFolder(path, FolderKind.PARQUET)
    if any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.rglob("*")):
        return LocalFolder(path, FolderKind.IMAGE_FOLDER)
    raise DataError(
        f"{key}={name!r} holds no parquet files, images or save_to_disk dataset: "
        "pass a folder like /path/to/cifar10 (train-*.parquet and test-*.parquet)"
    )


def describe(source: DataSource) -> str:
    """How the cache listing names a source."""
    if isinstance(source, HubDataset):
        return source.hub_id
    if isinstance(source, LocalFolder):
        return str(source.path)
    return SYNTHETIC_DATASET


def split_files(folder: LocalFolder, split: str) -> list[Path]:
    """The files of one split, by the Hugging Face naming conventions (may be empty)."""
    root = folder.path
    if folder.kind is FolderKind.SAVE_TO_DISK:
        return sorted(p for p in (root / split).rglob("*") if p.is_file())
    if folder.kind is FolderKind.PARQUET:
        return sorted(p for p in root.rglob("*.parquet") if _split_of(p.relative_to(root)) == split)
    return sorted(p for p in (root / split).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def required_split_files(folder: LocalFolder, split: str, key: str) -> list[Path]:
    """``split_files``, where none at all is the user's error."""
    files = split_files(folder, split)
    if not files:
        raise DataError(
            f"{key}={str(folder.path)!r} has no {split!r} split: expected {split}-*.parquet files, "
            f"a {split}/ folder of images, or a save_to_disk folder with {split}/"
        )
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


def check_dataset(dataset: str) -> None:
    """Fail fast on a dataset value that cannot work (missing folder or split); columns and
    images are checked when the split is decoded."""
    source = resolve_source(dataset)
    if isinstance(source, LocalFolder):
        for split in SPLITS:
            required_split_files(source, split, "dataset")


def class_names(dataset: str) -> tuple[str, ...]:
    """Class names for plots: CIFAR-10's, or an image folder's class folder names."""
    source = resolve_source(dataset)
    if isinstance(source, LocalFolder) and source.kind is FolderKind.IMAGE_FOLDER:
        return tuple(sorted({f.parent.name for f in split_files(source, "train")}))
    return CIFAR10_CLASSES
