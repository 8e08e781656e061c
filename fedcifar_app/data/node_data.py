"""One node's train/validation tensors: its partition of the run's dataset, or its own ``data-path``.

Memoised per process on every value that defines them (the files' fingerprint included), so a
ClientApp answering many messages builds its data once, and a changed value never gets stale data.
"""

from __future__ import annotations

import functools

import torch

from ..config import NodeData, Partitioner, RunConfig
from ..errors import DataError
from ..seeds import derive_seed
from .cache import clear_split_memo, load_split, split_fingerprint
from .partitions import PartitionKey, clear_partition_memos, partition_rows
from .sources import resolve_source
from .tensors import ImageTensors, NodeSplits


def load_node_data(config: RunConfig, node: NodeData) -> NodeSplits:
    """The node's train/validation tensors: its share of ``dataset`` or its own ``data-path``."""
    return _load_node_data(
        config.dataset,
        config.partitioner,
        config.dirichlet_alpha,
        config.seed,
        config.val_fraction,
        node,
        node_fingerprint(config.dataset, node),
    )


def node_fingerprint(dataset: str, node: NodeData) -> str:
    """The fingerprint of the train split this node draws from."""
    if node.data_path is not None:
        return split_fingerprint(resolve_source(node.data_path, "node config data-path"), "train", "data-path")
    return split_fingerprint(resolve_source(dataset), "train", "dataset")


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
    partition_id, num_partitions = node.partition
    where = f"partition {partition_id} of {num_partitions}"
    key = PartitionKey(dataset, fingerprint, partitioner, num_partitions, alpha, seed)
    if num_partitions > len(full):
        rows = torch.empty(0, dtype=torch.int64)  # too thin for the partitioner to even shard
    else:
        rows = torch.from_numpy(partition_rows(key, partition_id, len(full)))
    if len(rows) == 0:
        raise DataError(
            f"{where} is empty ({len(full)} training samples for {num_partitions} nodes); use fewer nodes or more data"
        )
    # index_select copies whole rows; `tensor[rows]` gathers byte by byte (7x slower on uint8 images).
    part = ImageTensors(full.images.index_select(0, rows), full.labels.index_select(0, rows))
    return split_train_val(part, val_fraction, derive_seed(seed, "val-split", partition_id), where)


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


def reset_process_caches() -> None:
    """Forget everything this process memoised (mapped splits, partitioners, node data), as a new
    process would start. For tests and the benchmark; the app never needs it (every memo is keyed
    on what defines its value)."""
    _load_node_data.cache_clear()
    clear_partition_memos()
    clear_split_memo()
