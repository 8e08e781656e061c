"""(0) the data path: cold decode into a fresh cache, warm memory-mapped load, node partitions;
and (5)'s partitioning of the train split 1,000 ways, in one process."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from common import Quiet, default_run_config, load_average


def bench_data(dataset: str, cache_dir: Path, quiet: Quiet) -> dict[str, Any]:
    """Cold decode into a fresh cache, warm memory-mapped load, and the 10 nodes' partitions."""
    quiet.wait("bench_data")
    from fedcifar_app import data
    from fedcifar_app.config import NodeData

    os.environ["FEDCIFAR_CACHE_DIR"] = str(cache_dir)
    shutil.rmtree(cache_dir, ignore_errors=True)
    import pyarrow.parquet  # noqa: F401  imports are start-up cost, not decoding
    import torchvision.io  # noqa: F401

    result: dict[str, Any] = {"load_before": load_average()}
    for split in ("train", "test"):
        data.reset_process_caches()
        started, cpu = time.perf_counter(), time.process_time()
        tensors = data.load_split(dataset, split)
        result[f"cold_decode_{split}_s"] = round(time.perf_counter() - started, 3)
        result[f"cold_decode_{split}_cpu_s"] = round(time.process_time() - cpu, 3)
        result[f"{split}_images"] = len(tensors)
    data.reset_process_caches()
    started = time.perf_counter()
    train = data.load_split(dataset, "train")
    int(train.images[::997].sum())  # touch a few pages
    result["warm_load_train_s"] = round(time.perf_counter() - started, 4)
    result["decode_images_per_s"] = round(result["train_images"] / result["cold_decode_train_s"])

    config = default_run_config(dataset)
    data.reset_process_caches()  # the partitioner and node data are built again, the split mapped again
    started = time.perf_counter()
    for pid in range(10):
        data.load_node_data(config, NodeData(partition_id=pid, num_partitions=10))
    result["ten_node_partitions_s"] = round(time.perf_counter() - started, 3)
    result["load_after"] = load_average()
    return result


def bench_partition_scale(dataset: str, cache_dir: Path, num_partitions: int) -> dict[str, Any]:
    """Partitioning the train split ``num_partitions`` ways, and every node's data, in one process."""
    from fedcifar_app import data
    from fedcifar_app.config import NodeData

    os.environ["FEDCIFAR_CACHE_DIR"] = str(cache_dir)
    config = default_run_config(dataset)
    data.reset_process_caches()
    started = time.perf_counter()
    data.load_node_data(config, NodeData(partition_id=0, num_partitions=num_partitions))
    first = time.perf_counter() - started
    for pid in range(1, num_partitions):
        data.load_node_data(config, NodeData(partition_id=pid, num_partitions=num_partitions))
    return {
        "num_partitions": num_partitions,
        "partitioner_and_first_node_s": round(first, 3),
        "all_nodes_s": round(time.perf_counter() - started, 3),
    }
