"""The real `flwr run .` on synthetic data and on a parquet folder in the CIFAR-10 schema."""

from __future__ import annotations

import json

import torch
from support.datasets import make_parquet_dataset
from support.flwr_run import SMALL_NODES, run_flwr

from fedcifar_app.model import Net

ROW_KEYS = {"round", "central-accuracy", "central-loss", "eval-accuracy", "eval-loss", "train-loss", "seconds"}


def assert_completed_run(run, rounds: int) -> list[dict]:
    assert run.run_folder is not None, run.output[-3000:]
    assert run.status["status"] == "completed", run.output[-3000:]
    metrics = run.metrics
    assert [row["round"] for row in metrics] == list(range(rounds + 1))
    assert all(ROW_KEYS <= set(row) for row in metrics)
    assert metrics[0]["train-loss"] is None and all(row["train-loss"] is not None for row in metrics[1:])
    for name in ("final_model.pt", "best_model.pt", "checkpoint.pt"):
        state = torch.load(run.run_folder / name, weights_only=True)
        Net().load_state_dict(state["weights"] if name == "checkpoint.pt" else state)
    config = json.loads((run.run_folder / "config.json").read_text())
    assert config["num-server-rounds"] == rounds
    assert str(run.run_folder) in run.output  # the folder is printed for the user
    return metrics


def test_synthetic_run_learns_and_writes_its_run_folder(tmp_path, flwr_env):
    run = run_flwr(tmp_path / "out", f"num-server-rounds=2 dataset='synthetic' {SMALL_NODES}", env=flwr_env)
    metrics = assert_completed_run(run, rounds=2)
    assert metrics[-1]["central-accuracy"] > metrics[0]["central-accuracy"] + 0.2
    assert "Data check: 3 nodes ready" in run.output and "Results per round" in run.output
    assert "Traceback" not in run.output
    assert list((tmp_path / "out").iterdir()) == [run.run_folder]  # nothing written beside the run folder
    assert not any(p.name.endswith(".tmp") for p in run.run_folder.iterdir())  # no half-written files left


def test_parquet_folder_run_with_dirichlet_partitions(tmp_path, flwr_env):
    dataset = make_parquet_dataset(tmp_path / "cifar", n_train=150, n_test=50)
    run = run_flwr(
        tmp_path / "out",
        f"num-server-rounds=2 dataset='{dataset}' partitioner='dirichlet' dirichlet-alpha=1.0 {SMALL_NODES}",
        env=flwr_env,
    )
    assert_completed_run(run, rounds=2)
    assert json.loads((run.run_folder / "config.json").read_text())["dataset"] == str(dataset)
