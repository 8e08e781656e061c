"""Safe files: atomic writes, unique run folders, checkpoints that load without pickle."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from unittest import mock

import pytest
import torch

from fedcifar_app.config import RunConfig
from fedcifar_app.errors import ConfigError
from fedcifar_app.files import atomic_write_json
from fedcifar_app.model import new_model
from fedcifar_app.runs.checkpoint import Checkpoint
from fedcifar_app.runs.folder import CHECKPOINT, RUN_FOLDER_FORMAT, create_run_folder, read_rows
from fedcifar_app.runs.metrics import RoundRow, rows_to_json, summary_table
from fedcifar_app.runs.recorder import RunRecorder


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path):
    with ThreadPoolExecutor(max_workers=8) as pool:
        folders = list(pool.map(lambda _: create_run_folder(tmp_path), range(24)))
    assert len(set(folders)) == 24 and all(f.is_dir() and f.parent == tmp_path for f in folders)


def test_a_failed_write_leaves_the_previous_file_and_no_debris(tmp_path):
    target = tmp_path / "metrics.json"
    atomic_write_json(target, [{"round": 0}])
    with mock.patch("os.replace", side_effect=OSError("disk full")), pytest.raises(OSError):
        atomic_write_json(target, [{"round": 0}, {"round": 1}])
    assert json.loads(target.read_text()) == [{"round": 0}]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_recorder_checkpoints_every_round_and_resume_reads_it_back(tmp_path):
    config = RunConfig(dataset="synthetic")
    recorder = RunRecorder.start(tmp_path, config, resumed=None)
    weights = {k: v.clone() for k, v in new_model(0).state_dict().items()}
    recorder.finish_round(0, 2.3, 0.10, weights)
    recorder.add_client_metrics({"train-loss": 1.5, "eval-loss": 1.4, "eval-accuracy": 0.4})
    recorder.finish_round(1, 1.2, 0.55, weights)
    checkpoint = Checkpoint.load(tmp_path)
    assert checkpoint.round == 1 and checkpoint.best_accuracy == 0.55
    assert [row.round for row in checkpoint.rows] == [0, 1]
    assert checkpoint.rows[1].eval_accuracy == 0.4 and checkpoint.rows[0].train_loss is None
    (tmp_path / "next").mkdir()
    resumed = RunRecorder.start(tmp_path / "next", config, resumed=checkpoint)
    assert resumed.round_offset == 1 and resumed.global_round(1) == 2
    assert json.loads((tmp_path / "next" / "metrics.json").read_text()) == rows_to_json(checkpoint.rows)
    assert "0.5500" in summary_table(checkpoint.rows)


def test_resume_refuses_a_different_experiment_or_no_rounds_left(tmp_path):
    recorder = RunRecorder.start(tmp_path, RunConfig(dataset="synthetic"), resumed=None)
    for round_number in (0, 1, 2):
        recorder.finish_round(round_number, 2.3, 0.1, new_model(0).state_dict())
    checkpoint = Checkpoint.load(tmp_path)
    with pytest.raises(ConfigError, match="seed=7 differs from the resumed run's seed=42"):
        checkpoint.check_compatible(RunConfig(dataset="synthetic", seed=7))
    with pytest.raises(ConfigError, match="already completed round 2: pass num-server-rounds greater than 2"):
        checkpoint.check_compatible(RunConfig(dataset="synthetic", num_server_rounds=2))
    checkpoint.check_compatible(RunConfig(dataset="synthetic", num_server_rounds=3, learning_rate=0.01))


class Exploit:
    """Unpickling this runs a shell command: what a hostile checkpoint would carry."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def test_checkpoints_load_with_weights_only_so_pickled_code_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    payload = {"round": 1, "weights": Exploit(str(marker)), "metrics": [], "best-accuracy": 0.0, "run-config": {}}
    torch.save(payload, tmp_path / CHECKPOINT)
    with pytest.raises(ConfigError, match="cannot be read"):
        Checkpoint.load(tmp_path)
    assert not marker.exists()
    torch.load(tmp_path / CHECKPOINT, weights_only=False)  # the same file, unpickled unsafely: the command runs
    assert marker.exists()


def test_run_folders_of_the_first_format_still_resume_and_read(tmp_path):
    """Format 1 (before RUN_FOLDER_FORMAT existed): no format field, rows without newer keys."""
    rows = [
        {"round": 0, "central-accuracy": 0.1, "central-loss": 2.3, "eval-accuracy": None, "eval-loss": None,
         "train-loss": None, "seconds": 3.0},
        {"round": 1, "central-accuracy": 0.3, "central-loss": 2.0, "eval-accuracy": 0.28, "eval-loss": 2.1,
         "train-loss": 2.2, "seconds": 4.0},
    ]  # fmt: skip
    run_config = RunConfig(dataset="synthetic").to_run_config()
    weights = new_model(0).state_dict()
    torch.save(
        {"round": 1, "weights": weights, "metrics": rows, "best-accuracy": 0.3, "run-config": run_config},
        tmp_path / CHECKPOINT,
    )
    (tmp_path / "metrics.json").write_text(json.dumps(rows))
    (tmp_path / "status.json").write_text(json.dumps({"status": "completed", "reason": "", "updated": "x"}))
    checkpoint = Checkpoint.load(tmp_path)
    assert checkpoint.round == 1 and [row.round for row in checkpoint.rows] == [0, 1]
    assert checkpoint.rows[1] == RoundRow(1, 0.3, 2.0, 0.28, 2.1, 2.2, 4.0)
    assert read_rows(tmp_path) == checkpoint.rows
    checkpoint.check_compatible(RunConfig(dataset="synthetic", num_server_rounds=3))
    (tmp_path / "next").mkdir()
    RunRecorder.start(tmp_path / "next", RunConfig(dataset="synthetic", num_server_rounds=3), checkpoint)
    assert json.loads((tmp_path / "next" / "metrics.json").read_text()) == rows_to_json(checkpoint.rows)
    assert json.loads((tmp_path / "next" / "status.json").read_text())["format"] == RUN_FOLDER_FORMAT


def test_metrics_json_stays_strict_json_when_a_value_is_not_finite(tmp_path):
    row = RoundRow(round=3, central_accuracy=0.5, central_loss=float("nan"), train_loss=float("inf"))
    assert row.to_json()["central-loss"] is None and row.to_json()["train-loss"] is None
    with pytest.raises(ValueError):  # the writer refuses NaN outright rather than writing a non-JSON token
        atomic_write_json(tmp_path / "x.json", {"loss": float("nan")})
    assert not (tmp_path / "x.json").exists()
