"""Bad input stops a run before training with one line naming the key or file, the value and the fix.

The table drives each case through the layer that must catch it; the end-to-end cases show the
same messages reach a real `flwr run .`: one ERROR line, status "failed", no traceback, no hang.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from support.datasets import encode_image, make_parquet_dataset, write_parquet_split
from support.flwr_run import SMALL_NODES, run_flwr, small_federation
from support.inprocess import run_inprocess

from fedcifar_app.config import DeviceChoice, NodeData, RunConfig
from fedcifar_app.data import check_dataset, load_node_data, load_split
from fedcifar_app.errors import ConfigError, DataError, RunAborted
from fedcifar_app.model import new_model
from fedcifar_app.pyproject import parse_overrides
from fedcifar_app.runs.checkpoint import Checkpoint
from fedcifar_app.runs.folder import create_run_folder
from fedcifar_app.runs.recorder import RunRecorder
from fedcifar_app.server.hooks import wait_for_nodes
from fedcifar_app.training import pick_device

USER_ERRORS = (ConfigError, DataError, RunAborted)


class FixedGrid:
    """Only what wait_for_nodes reads from a Grid: the connected node ids."""

    def __init__(self, count: int) -> None:
        self.count = count

    def get_node_ids(self):
        return list(range(1, self.count + 1))


def config(**values) -> RunConfig:
    return RunConfig.from_run_config(values)


def corrupt_parquet(root: Path) -> Path:
    make_parquet_dataset(root, n_train=20, n_test=10)
    (root / "train-00000-of-00001.parquet").write_bytes(b"PAR1 this is not a parquet file")
    return root


def wrong_columns(root: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True)
    for split in ("train", "test"):
        pq.write_table(pa.table({"image": [b"x"], "target": [1]}), root / f"{split}-00000-of-00001.parquet")
    return root


def images_of(root: Path, pixels: np.ndarray, labels: list[int]) -> Path:
    for split in ("train", "test"):
        write_parquet_split(root / f"{split}-00000-of-00001.parquet", [encode_image(p) for p in pixels], labels)
    return root


def without_test_split(root: Path) -> Path:
    make_parquet_dataset(root, n_train=10, n_test=10)
    (root / "test-00000-of-00001.parquet").unlink()
    return root


def foreign_checkpoint(root: Path) -> Path:
    root.mkdir(parents=True)
    weights = {"fc.weight": torch.zeros(3, 5), "fc.bias": torch.zeros(3)}
    torch.save(
        {"round": 1, "weights": weights, "metrics": [], "best-accuracy": 0.1, "run-config": {}}, root / "checkpoint.pt"
    )
    return root


def truncated_checkpoint(root: Path) -> Path:
    """A real checkpoint cut in half, as a full disk or a copy interrupted midway leaves it."""
    root.mkdir(parents=True)
    recorder = RunRecorder.start(root, RunConfig(dataset="synthetic"), None)
    recorder.finish_round(0, 2.3, 0.1, new_model(0).state_dict())
    data = (root / "checkpoint.pt").read_bytes()
    (root / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    return root


CASES: list[tuple[str, Callable[[Path], object], tuple[str, ...]]] = [
    ("unknown partitioner", lambda t: config(partitioner="shards"), ("partitioner='shards'", "'iid', 'dirichlet'")),
    ("alpha zero", lambda t: config(**{"dirichlet-alpha": 0.0}), ("dirichlet-alpha=0.0", "> 0")),
    ("alpha negative", lambda t: config(**{"dirichlet-alpha": -1.0}), ("dirichlet-alpha=-1.0", "> 0")),
    ("fraction-train 0", lambda t: config(**{"fraction-train": 0.0}), ("fraction-train=0.0", "(0, 1]")),
    ("fraction-evaluate > 1", lambda t: config(**{"fraction-evaluate": 1.2}), ("fraction-evaluate=1.2", "(0, 1]")),
    ("rounds < 1", lambda t: config(**{"num-server-rounds": 0}), ("num-server-rounds=0", ">= 1")),
    ("batch size < 1", lambda t: config(**{"batch-size": 0}), ("batch-size=0", ">= 1")),
    ("learning rate <= 0", lambda t: config(**{"learning-rate": 0.0}), ("learning-rate=0.0", "> 0")),
    ("val-fraction 1", lambda t: config(**{"val-fraction": 1.0}), ("val-fraction=1.0", "(0, 1)")),
    ("wrong type", lambda t: config(**{"local-epochs": "two"}), ("local-epochs='two'", "integer")),
    ("unknown key", lambda t: config(**{"rounds": 3}), ("rounds", "allowed keys")),
    (
        "min nodes > available",
        lambda t: config(**{"min-train-nodes": 12}),
        ("min-available-nodes=10", "min-train-nodes (12)"),
    ),
    ("dataset path missing", lambda t: check_dataset(str(t / "nope")), ("dataset=", "no such folder")),
    ("dataset is a file", lambda t: check_dataset(str(Path(__file__))), ("is a file", "folder")),
    ("no test split", lambda t: check_dataset(str(without_test_split(t / "d"))), ("no 'test' split",)),
    (
        "missing img/label columns",
        lambda t: load_split(str(wrong_columns(t / "d")), "train"),
        ("lacks column(s) img, label", "uoft-cs/cifar10"),
    ),
    (
        "images not 32x32",
        lambda t: load_split(str(images_of(t / "d", np.zeros((4, 28, 28, 3), np.uint8), [0, 1, 2, 3])), "train"),
        ("28x28", "32x32 RGB"),
    ),
    (
        "grayscale images",
        lambda t: load_split(str(images_of(t / "d", np.zeros((4, 32, 32, 1), np.uint8), [0, 1, 2, 3])), "train"),
        ("1 channel", "32x32 RGB"),
    ),
    (
        "labels outside 0..9",
        lambda t: load_split(str(make_parquet_dataset(t / "d", 20, 10, label_offset=1)), "train"),
        ("label 10", "outside 0..9"),
    ),
    (
        "corrupt parquet",
        lambda t: load_split(str(corrupt_parquet(t / "d")), "train"),
        ("cannot read", "train-00000-of-00001.parquet", "replace"),
    ),
    (
        "too many partitions",
        lambda t: load_node_data(config(dataset="synthetic"), NodeData(2999, 3000)),
        ("partition 2999 of 3000", "fewer nodes"),
    ),
    (
        "dirichlet leaves a node empty",
        lambda t: load_node_data(
            config(dataset="synthetic", partitioner="dirichlet", **{"dirichlet-alpha": 0.001}), NodeData(0, 500)
        ),
        ("dirichlet-alpha=0.001", "500 nodes", "raise dirichlet-alpha"),
    ),
    (
        "node config without partition",
        lambda t: NodeData.from_node_config({"partition": 1}),
        ("partition-id and num-partitions, or data-path", "--node-config"),
    ),
    ("resume-from not a run folder", lambda t: Checkpoint.load(t), ("resume-from=", "not a run folder")),
    (
        "resume-from another model",
        lambda t: Checkpoint.load(foreign_checkpoint(t / "run")),
        ("resume-from=", "another shape"),
    ),
    (
        "output-dir not writable",
        lambda t: create_run_folder((t / "file").touch() or t / "file" / "out"),
        ("output-dir=", "cannot be written"),
    ),
    (
        "truncated checkpoint",
        lambda t: Checkpoint.load(truncated_checkpoint(t / "run")),
        ("checkpoint.pt cannot be read", "damaged or not a checkpoint", "resume from another run folder"),
    ),
    (
        "fewer simulated nodes than needed",
        lambda t: wait_for_nodes(FixedGrid(3), 10, 60, simulation=True),
        ("3 SuperNodes", "needs 10", "options.num-supernodes"),
    ),
    (
        "nodes never arrive",
        lambda t: wait_for_nodes(FixedGrid(1), 2, 0.5, simulation=False),
        ("only 1 of the 2", "node-wait-timeout=0.5s"),
    ),
]


@pytest.mark.parametrize("name, trigger, fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_that_names_the_problem_and_the_fix(tmp_path, name, trigger, fragments):
    with pytest.raises(USER_ERRORS) as caught:
        trigger(tmp_path)
    message = str(caught.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_without_a_gpu_is_a_config_error_naming_the_fix():
    with pytest.raises(
        ConfigError, match=r"device='cuda' but this machine's PyTorch sees no CUDA GPU.*use device='auto'"
    ):
        pick_device(DeviceChoice.CUDA)


def folder_digest(folder: Path) -> str:
    return hashlib.sha256(
        b"".join(p.name.encode() + p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())
    ).hexdigest()


@contextlib.contextmanager
def untouched_inputs(tmp_path: Path, make_override: Callable[[Path], str]) -> Iterator[str]:
    """The case's override, built on files in a folder of its own; the run must leave them as they were."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    override = make_override(inputs)
    before = folder_digest(inputs)
    yield override
    assert folder_digest(inputs) == before  # inputs, a resumed folder included, are never touched


def tiny_dataset(root: Path) -> Path:
    """Four training images for three nodes: two partitions hold one sample, too few to split."""
    return make_parquet_dataset(root, n_train=4, n_test=10)


# Failing runs, each (name, run-config override, expected message, number of simulated SuperNodes).
# Two go through the real `flwr run .` (a server-side and a node-side failure: the CLI's output is
# what a user reads); the rest run in process (Flower's engine, the real apps; seconds, not ~20 s).
REAL_RUN_CASES = [
    ("bad partitioner", lambda t: "partitioner='shards'", "partitioner='shards' is not allowed", 3),
    ("partitions too small", lambda t: f"dataset='{tiny_dataset(t / 'd')}'", "too few to split", 3),
]
IN_PROCESS_CASES = [
    ("missing dataset", lambda t: f"dataset='{t}/missing'", "no such folder", 3),
    (
        "labels out of range",
        lambda t: f"dataset='{make_parquet_dataset(t / 'd', 20, 10, label_offset=1)}'",
        "outside 0..9",
        3,
    ),
    ("more nodes needed than simulated", lambda t: "", "simulated federation has 2 SuperNodes", 2),
    ("resume from a non-run folder", lambda t: f"resume-from='{t}'", "not a run folder", 3),
    ("cuda on a machine without a GPU", lambda t: "device='cuda'", "device='cuda' but this machine's PyTorch", 3),
]


@pytest.mark.parametrize(
    "name, make_override, expected, supernodes", REAL_RUN_CASES, ids=[c[0] for c in REAL_RUN_CASES]
)
def test_flwr_run_fails_fast_with_one_error_line_and_a_failed_status(
    tmp_path, flwr_env, name, make_override, expected, supernodes
):
    with untouched_inputs(tmp_path, make_override) as override:
        dataset = "" if override.startswith("dataset=") else "dataset='synthetic'"
        run = run_flwr(
            tmp_path / "out",
            f"{dataset} {SMALL_NODES} {override}",
            env=flwr_env,
            timeout=180,
            federation_config=small_federation(supernodes),
        )
    error_lines = [line for line in run.output.splitlines() if "ERROR" in line]
    assert len(error_lines) == 1 and expected in error_lines[0], run.output[-3000:]
    assert "Traceback" not in run.output
    assert run.status["status"] == "failed" and expected in run.status["reason"]
    assert not (run.run_folder / "metrics.json").exists() or run.metrics == []  # nothing trained


def failing_run_in_process(tmp_path: Path, caplog, override: str, supernodes: int = 3) -> tuple[Path, list[str]]:
    """Run in process; return the run folder and every ERROR-or-worse log line of the run."""
    values = parse_overrides(f"{SMALL_NODES} {override} output-dir='{tmp_path / 'out'}'")
    values.setdefault("dataset", "synthetic")
    with caplog.at_level(logging.INFO):
        folder = run_inprocess(values, num_supernodes=supernodes)
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert not any(record.exc_info for record in caplog.records), "a traceback was logged"
    return folder, errors


@pytest.mark.parametrize(
    "name, make_override, expected, supernodes", IN_PROCESS_CASES, ids=[c[0] for c in IN_PROCESS_CASES]
)
def test_a_failing_run_stops_before_training_with_one_error_line_and_a_failed_status(
    tmp_path, caplog, name, make_override, expected, supernodes
):
    with untouched_inputs(tmp_path, make_override) as override:
        folder, errors = failing_run_in_process(tmp_path, caplog, override, supernodes)
    assert len(errors) == 1 and expected in errors[0], errors
    status = json.loads((folder / "status.json").read_text())
    assert status["status"] == "failed" and expected in status["reason"]
    assert not (folder / "metrics.json").exists() or json.loads((folder / "metrics.json").read_text()) == []


def test_diverging_training_fails_in_one_line_keeping_the_last_finite_checkpoint_and_strict_json(tmp_path, caplog):
    folder, errors = failing_run_in_process(tmp_path, caplog, "num-server-rounds=3 learning-rate=1e30")
    assert len(errors) == 1, errors
    assert "round 1: training diverged" in errors[0] and "learning-rate=1e+30 is likely too high" in errors[0]
    status = json.loads((folder / "status.json").read_text())
    assert status["status"] == "failed" and "resume-from=" in status["reason"]

    def refuse(token: str):
        raise AssertionError(f"metrics.json holds {token}, which is not JSON")

    rows = json.loads((folder / "metrics.json").read_text(), parse_constant=refuse)
    assert [row["round"] for row in rows] == [0]  # the diverged round is not recorded
    assert Checkpoint.load(folder).round == 0  # the last finite model


def test_unwritable_output_dir_fails_with_one_line(tmp_path, flwr_env):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    run = run_flwr(blocker / "out", "dataset='synthetic' " + SMALL_NODES, env=flwr_env, timeout=180)
    error_lines = [line for line in run.output.splitlines() if "ERROR" in line]
    assert len(error_lines) == 1 and "cannot be written" in error_lines[0], run.output[-3000:]
    assert blocker.read_text() == "a file where a folder should be"
