"""Datasets as uint8 tensors, Flower-free: sources, decoding once, an on-disk cache, partitioning.

Every image is decoded once per machine, not once per epoch, and memory-mapped afterwards, so a
node's partition costs one ``index_select`` copy; normalisation happens per batch on the tensor.
Where each concern lives (imports run one way, top to bottom):

    tensors     ImageTensors, NodeSplits, normalize: what the package hands out (its errors are errors.DataError)
    sources     what a ``dataset`` value names (folder kinds, hub id, synthetic) and its split files
    decoding    JPEG/PNG bytes -> uint8 arrays: one buffer, threaded batched decoding
    readers     one split of a source -> checked arrays (parquet via Arrow buffers, image folders, HF)
    cache       the decode-once cache: fingerprints, entries, the lock, damaged-entry rebuilds
    partitions  IID / Dirichlet rows per node (PartitionKey)
    node_data   a node's train/validation tensors; reset_process_caches
    cache_cli   ``fedcifar-cache info|clear``
"""

from .cache import CACHE_FORMAT, cache_root, load_split
from .cache_cli import main as cache_main
from .decoding import decode_images
from .node_data import load_node_data, reset_process_caches, split_train_val
from .partitions import PartitionKey
from .readers import synthetic_split
from .sources import (
    IMAGE_SUFFIXES,
    SPLITS,
    DataSource,
    FolderKind,
    HubDataset,
    LocalFolder,
    SyntheticDataset,
    check_dataset,
    class_names,
    resolve_source,
)
from .tensors import CIFAR10_CLASSES, ImageTensors, NodeSplits, normalize

__all__ = [
    "CACHE_FORMAT",
    "CIFAR10_CLASSES",
    "IMAGE_SUFFIXES",
    "SPLITS",
    "DataSource",
    "FolderKind",
    "HubDataset",
    "ImageTensors",
    "LocalFolder",
    "NodeSplits",
    "PartitionKey",
    "SyntheticDataset",
    "cache_main",
    "cache_root",
    "check_dataset",
    "class_names",
    "decode_images",
    "load_node_data",
    "load_split",
    "normalize",
    "reset_process_caches",
    "resolve_source",
    "split_train_val",
    "synthetic_split",
]
