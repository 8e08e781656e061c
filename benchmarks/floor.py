"""(1) the compute floor: one round's training and evaluation work in this single plain PyTorch
process on pre-decoded tensors (fedcifar_app.training + fedcifar_app.data), no Flower: 10 IID
clients train 1 local epoch each from the same global model, FedAvg, evaluation on half the
clients' validation splits and on the central test split."""

from __future__ import annotations

import os
import random
import statistics
import time
from pathlib import Path
from typing import Any

from common import Quiet, default_run_config, load_average, log


def fedavg(updates: list[tuple[dict, int]]) -> dict:
    """Weighted average by number of examples, as FedAvg(weighted_by_key='num-examples')."""
    total = sum(n for _, n in updates)
    keys = updates[0][0].keys()
    return {k: sum(w[k].double() * (n / total) for w, n in updates).to(updates[0][0][k].dtype) for k in keys}


def bench_floor(dataset: str, cache_dir: Path, rounds: int, threads: int | None, quiet: Quiet) -> dict[str, Any]:
    """One round's work (train 10 clients, FedAvg, evaluate half the clients + the test split) per round."""
    import torch

    from fedcifar_app import data, training
    from fedcifar_app.config import NodeData
    from fedcifar_app.model import Net, new_model
    from fedcifar_app.seeds import derive_seed

    os.environ["FEDCIFAR_CACHE_DIR"] = str(cache_dir)
    if threads:
        torch.set_num_threads(threads)
    config = default_run_config(dataset)
    nodes = [NodeData(partition_id=i, num_partitions=10) for i in range(10)]
    parts = [data.load_node_data(config, node) for node in nodes]  # pre-decoded, not timed
    test = data.load_split(dataset, "test")
    device = torch.device("cpu")
    weights = new_model(derive_seed(config.seed, "init")).state_dict()
    model = Net()
    rows = []
    sampler = random.Random(config.seed)
    quiet.wait("floor")
    result: dict[str, Any] = {"load_before": load_average(), "torch_threads": torch.get_num_threads()}
    for server_round in range(1, rounds + 1):
        started, cpu_started = time.perf_counter(), time.process_time()
        updates, losses, train_s = [], [], []
        for node, part in zip(nodes, parts, strict=True):
            client_start = time.perf_counter()
            local = Net()
            local.load_state_dict(weights)
            loss = training.train(
                local,
                part.train,
                epochs=config.local_epochs,
                batch_size=config.batch_size,
                learning_rate=config.learning_rate,
                device=device,
                seed=derive_seed(config.seed, "train", server_round, node.label),
            )
            updates.append((training.get_weights(local), len(part.train)))
            losses.append(loss)
            train_s.append(time.perf_counter() - client_start)
        weights = fedavg(updates)
        trained = time.perf_counter()
        model.load_state_dict(weights)
        evaluated = [training.evaluate(model, parts[i].val, device) for i in sampler.sample(range(10), 5)]
        client_eval = time.perf_counter()
        central = training.evaluate(model, test, device)
        ended = time.perf_counter()
        rows.append(
            {
                "round": server_round,
                "seconds": round(ended - started, 3),
                "cpu_s": round(time.process_time() - cpu_started, 3),
                "train_s": round(trained - started, 3),
                "client_eval_s": round(client_eval - trained, 3),
                "central_eval_s": round(ended - client_eval, 3),
                "mean_client_train_s": round(statistics.mean(train_s), 3),
                "eval_accuracy": round(
                    sum(r.accuracy * r.num_examples for r in evaluated) / sum(r.num_examples for r in evaluated), 4
                ),
                "central_accuracy": round(central.accuracy, 4),
            }
        )
        log(
            f"floor round {server_round}: {rows[-1]['seconds']:.2f}s (train {rows[-1]['train_s']:.2f}s, "
            f"central eval {rows[-1]['central_eval_s']:.2f}s) central-acc {central.accuracy:.4f}"
        )
    seconds = [r["seconds"] for r in rows]
    train_samples = sum(len(p.train) for p in parts)
    result.update(
        rounds=rows,
        round_s=round(statistics.median(seconds), 3),
        round_cpu_s=round(statistics.median(r["cpu_s"] for r in rows), 3),
        round_min_s=min(seconds),
        train_images_per_s=round(train_samples / statistics.median(r["train_s"] for r in rows)),
        final_central_accuracy=rows[-1]["central_accuracy"],
        load_after=load_average(),
    )
    return result


def add_floor_rounds(
    results: dict[str, Any],
    dataset: str,
    cache_dir: Path,
    thread_counts: tuple[int, ...],
    quiet: Quiet,
    *,
    first_rounds: int,
    other_rounds: int,
) -> None:
    """Run floor rounds for every thread count, then recompute each variant over all its rounds so far.

    The floor is the plain variant, torch's default threads (report.summarise takes its median round);
    calling this between the flwr runs spreads the floor's rounds over the same stretch of time.
    """
    variants = results.setdefault("floor_variants", {})
    for index, threads in enumerate(thread_counts):
        measured = bench_floor(dataset, cache_dir, first_rounds if index == 0 else other_rounds, threads, quiet)
        variant = variants.setdefault(f"threads={threads}", {"torch_threads": measured["torch_threads"], "passes": []})
        variant["passes"].append(measured)
        rows = [row for one in variant["passes"] for row in one["rounds"]]
        variant.update(
            round_s=round(statistics.median(r["seconds"] for r in rows), 3),
            round_min_s=min(r["seconds"] for r in rows),
            round_cpu_s=round(statistics.median(r["cpu_s"] for r in rows), 3),
            rounds_measured=len(rows),
            final_central_accuracy=variant["passes"][0]["final_central_accuracy"],
            accuracy_after_rounds=len(variant["passes"][0]["rounds"]),
            train_images_per_s=round(statistics.median(one["train_images_per_s"] for one in variant["passes"])),
            load_before=variant["passes"][0]["load_before"],
            load_after=measured["load_after"],
        )
    results["floor"] = max(variants.values(), key=lambda v: v["torch_threads"])  # the plain one: torch's default
