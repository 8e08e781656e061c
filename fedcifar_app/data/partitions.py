"""Which rows of the shared training split each node gets: flwr-datasets' IID and Dirichlet
partitioners, computed on labels and row numbers only (never images), memoised per process on
every value that defines them."""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import numpy as np

from ..config import Partitioner
from ..errors import DataError
from .cache import load_split


@dataclass(frozen=True)
class PartitionKey:
    """Every value that defines a partitioning of a dataset's train split (the memo's key)."""

    dataset: str
    fingerprint: str  # of the train split's files: an edited dataset is partitioned again
    partitioner: Partitioner
    num_partitions: int
    alpha: float
    seed: int


def partition_rows(key: PartitionKey, partition_id: int, num_samples: int) -> np.ndarray:
    """Row indices of one partition; Dirichlet's failure becomes a message that says the fix."""
    if key.partitioner is Partitioner.IID:
        return _iid_rows(num_samples, key.num_partitions, key.seed, partition_id)
    try:
        with warnings.catch_warnings():
            # flwr-datasets warns on every retry with the whole alpha vector (1,000 floats for 1,000
            # nodes); the outcome, success or the DataError below, is what the user needs.
            warnings.simplefilter("ignore", UserWarning)
            return _dirichlet(key).load_partition(partition_id).with_format("arrow")["row"].to_numpy()
    except ValueError as err:
        raise DataError(
            f"partitioner='dirichlet' with dirichlet-alpha={key.alpha} cannot give each of {key.num_partitions} "
            f"nodes 2 or more of the {num_samples} samples ({err}); raise dirichlet-alpha or use fewer nodes"
        ) from None


@functools.lru_cache(maxsize=8)
def _dirichlet(key: PartitionKey):
    """flwr-datasets' Dirichlet partitioner over the split's labels, one per process per key.

    It sees only labels and row numbers, never images, so partitioning 1,000 ways stays cheap.
    """
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner

    labels = load_split(key.dataset, "train").labels.numpy()
    table = Dataset.from_dict({"label": labels, "row": np.arange(len(labels))})
    splitter = DirichletPartitioner(
        num_partitions=key.num_partitions,
        partition_by="label",
        alpha=key.alpha,
        min_partition_size=2,  # one training and one validation sample at least
        self_balancing=False,
        shuffle=True,
        seed=key.seed,
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


def clear_partition_memos() -> None:
    """Forget this process's partitioners (``fedcifar_app.data.reset_process_caches`` calls it)."""
    _dirichlet.cache_clear()
    _iid_permutation.cache_clear()
