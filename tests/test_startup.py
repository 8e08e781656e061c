"""What keeps a simulation's start-up short, and that none of it changes a run's results."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from support.flwr_run import PROJECT
from support.inprocess import run_inprocess

from fedcifar_app import training
from fedcifar_app.config import RunConfig
from fedcifar_app.data import load_split
from fedcifar_app.errors import RunAborted
from fedcifar_app.model import new_model
from fedcifar_app.seeds import derive_seed
from fedcifar_app.server.data_check import SIMULATION_DATA_CHECK_NODES, check_node_data


def test_loading_the_two_apps_imports_no_torch():
    """flower-simulation loads both apps under one lock, then starts Ray: torch imported while loading
    them would hold Ray back. The ServerApp imports it when its run starts, a node with its first message."""
    probe = (
        "import sys, fedcifar_app.server.app, fedcifar_app.client.app; "
        "print(sorted(m for m in ('torch', 'torchvision', 'matplotlib') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=PROJECT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


class AnsweringGrid:
    """Answers each data-check query as a healthy node would, and remembers whom it was asked."""

    def __init__(self, failing: frozenset[int] = frozenset()) -> None:
        self.asked: list[int] = []
        self.failing = failing

    def send_and_receive(self, messages, timeout):
        replies = []
        for number, message in enumerate(messages):
            node_id = message.metadata.dst_node_id
            # As Flower's grids do when they push (grpc_grid.py, inmemory_grid.py): Metadata has no public setter
            # for the id, and the app matches replies on the messages it created.
            message.metadata.__dict__["_message_id"] = f"query-{number}"
            self.asked.append(node_id)
            if node_id in self.failing:
                continue  # no reply: it counts as a failure
            content = {"metrics": MetricRecord({"num-train": 40}), "info": ConfigRecord({"data": f"node {node_id}"})}
            replies.append(Message(RecordDict(content), reply_to=message))
        return replies


def config(**overrides) -> RunConfig:
    values = {"dataset": "synthetic", "min-train-nodes": 10, "min-evaluate-nodes": 5, "min-available-nodes": 10}
    return RunConfig.from_run_config({**values, **overrides})


def test_a_large_simulation_checks_a_seeded_sample_and_a_deployment_every_node():
    node_ids = list(range(1000, 1000 + 500))
    simulated = AnsweringGrid()
    names = check_node_data(simulated, node_ids, config(), simulation=True)
    assert len(simulated.asked) == SIMULATION_DATA_CHECK_NODES == len(names)
    again = AnsweringGrid()
    check_node_data(again, node_ids, config(), simulation=True)
    assert again.asked == simulated.asked  # the same seed asks the same nodes
    other_seed = AnsweringGrid()
    check_node_data(other_seed, node_ids, config(seed=7), simulation=True)
    assert other_seed.asked != simulated.asked

    wide = AnsweringGrid()  # a run that needs more nodes per round than the sample asks as many
    check_node_data(wide, node_ids, config(**{"min-train-nodes": 64, "min-available-nodes": 64}), simulation=True)
    assert len(wide.asked) == 64

    deployed = AnsweringGrid()
    check_node_data(deployed, node_ids, config(), simulation=False)
    assert deployed.asked == node_ids


def test_a_sample_with_too_few_usable_nodes_still_stops_the_run_before_training():
    node_ids = list(range(1, 101))
    everyone_fails = AnsweringGrid(failing=frozenset(node_ids))
    with pytest.raises(RunAborted, match=r"data check failed on 20 of 20 nodes, 0 usable but .* need 10"):
        check_node_data(everyone_fails, node_ids, config(), simulation=True)


def test_round_zero_evaluated_during_start_up_is_the_initial_models_central_evaluation(tmp_path):
    """Round 0 is computed beside the engine's start-up; its row must be what evaluating the
    initial model gives, and a 30-node run (data check on a sample of 20) must train as usual."""
    overrides = {
        "dataset": "synthetic",
        "num-server-rounds": 1,
        "fraction-train": 0.1,
        "fraction-evaluate": 0.1,
        "min-train-nodes": 3,
        "min-evaluate-nodes": 2,
        "min-available-nodes": 30,
        "output-dir": str(tmp_path / "out"),
    }
    folder = run_inprocess(overrides, num_supernodes=30)
    assert json.loads((folder / "status.json").read_text())["status"] == "completed"
    rows = json.loads((folder / "metrics.json").read_text())
    assert [row["round"] for row in rows] == [0, 1]
    expected = training.evaluate(
        new_model(derive_seed(42, "init")), load_split("synthetic", "test"), torch.device("cpu")
    )
    assert rows[0]["central-accuracy"] == expected.accuracy
    assert rows[0]["central-loss"] == pytest.approx(expected.loss, rel=1e-6)
    log = (folder / "run.log").read_text()
    assert "Data check: 20 nodes ready (a sample of the 30)" in log, log
    assert (folder / "samples.png").stat().st_size > 0
    assert Path(folder / "checkpoint.pt").exists()
