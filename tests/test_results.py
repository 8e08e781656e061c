"""The run folder: reproducible runs, kill-and-resume, plots.

The end-to-end tests run the REAL `flwr run .` (simulation, 3 SuperNodes, synthetic data,
min nodes 3/2/3, its own output-dir and FEDCIFAR_CACHE_DIR)
as a subprocess in its own session, judge each run by the folder it wrote (status.json,
metrics.json, checkpoint.pt) and never by the exit code (flwr 1.25 exits 0 even when the
ServerApp failed), and kill the whole session on timeout and in teardown, since a killed
`flwr run` would leave flower-simulation and Ray behind.

Three runs are shared by all the end-to-end assertions (module-scoped fixtures):
  uninterrupted  4 rounds, start to end;
  killed         the same config, SIGKILLed (whole process group) once round 2's checkpoint exists;
  resumed        resume-from=<killed folder>, num-server-rounds=4.
"killed" is also the second run of the reproducibility check: its rounds 0..2 must match
"uninterrupted", and "resumed" must match it on rounds 3..4.

The learning rate is low on purpose: with the defaults the synthetic set reaches accuracy
1.0 by round 2, and equal accuracies would prove nothing; at learning-rate=0.0002 the
accuracy differs in every round (checked below), and central-loss is compared too.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from support.flwr_run import FlwrRun, flwr_environment, small_federation

from fedcifar_app.config import RunConfig
from fedcifar_app.data import ImageTensors
from fedcifar_app.logs import APP_LOGGER
from fedcifar_app.model import Net
from fedcifar_app.runs import plots
from fedcifar_app.runs import recorder as recorder_module
from fedcifar_app.runs.checkpoint import Checkpoint
from fedcifar_app.runs.folder import BEST_MODEL, CHECKPOINT, CONFIG, FINAL_MODEL, METRICS
from fedcifar_app.runs.metrics import RoundRow, rows_to_json
from fedcifar_app.runs.recorder import RunRecorder
from fedcifar_app.runs.status import STATUS, read_status

NUM_ROUNDS = 4
KILL_AFTER_ROUND = 2
RUN_TIMEOUT_S = 300
ACCURACY_TOLERANCE = 0.002
LOSS_TOLERANCE = {"rel": 1e-3, "abs": 1e-5}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# One --run-config string: flwr refuses a key given twice, even across two flags.
BASE_CONFIG = (
    "dataset='synthetic' min-train-nodes=3 min-evaluate-nodes=2 min-available-nodes=3 "
    "learning-rate=0.0002 batch-size=64"
)


# --------------------------------------------------------------------------- helpers


def start_run(workdir: Path, name: str, cache_dir: Path, extra_config: str = "") -> FlwrRun:
    config = f"{BASE_CONFIG} num-server-rounds={NUM_ROUNDS} {extra_config}".strip()
    return FlwrRun(
        workdir / name, config, env=flwr_environment(cache_dir), federation_config=small_federation(3)
    ).start()


def finished_folder(run: FlwrRun) -> Path:
    run.wait(RUN_TIMEOUT_S)
    assert run.folder is not None, f"flwr run made no run folder; log tail:\n{run.log_tail()}"
    return run.folder


def read_json(path: Path):
    return json.loads(path.read_text())


def completed(folder: Path, run: FlwrRun) -> list[dict]:
    """The run's rows, after checking status.json says it completed."""
    status = read_json(folder / STATUS)
    assert status["status"] == "completed", f"{folder}: {status}; log tail:\n{run.log_tail()}"
    return read_json(folder / METRICS)


def by_round(rows: list[dict]) -> dict[int, dict]:
    return {row["round"]: row for row in rows}


def assert_same_numbers(row: dict, expected: dict) -> None:
    where = f"round {row['round']}"
    assert abs(row["central-accuracy"] - expected["central-accuracy"]) <= ACCURACY_TOLERANCE, where
    assert row["central-loss"] == pytest.approx(expected["central-loss"], **LOSS_TOLERANCE), where


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, after checking the signature."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def png_pixels(path: Path):
    """The decoded RGB pixels, as a numpy array (height, width, 3)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def curve_pixels(path: Path) -> int:
    """How many pixels have matplotlib's first line colour (C0, #1f77b4): the central curves."""
    import numpy as np

    pixels = png_pixels(path).astype(int)
    return int((np.abs(pixels - np.array([31, 119, 180])).sum(axis=2) < 40).sum())


# --------------------------------------------------------------------------- shared runs


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def cache_dir(workdir) -> Path:
    return workdir / "cache"


@pytest.fixture(scope="module")
def uninterrupted(workdir, cache_dir) -> Iterator[tuple[Path, FlwrRun]]:
    run = start_run(workdir, "uninterrupted", cache_dir)
    try:
        yield finished_folder(run), run
    finally:
        run.kill()


@pytest.fixture(scope="module")
def killed(workdir, cache_dir) -> Iterator[tuple[Path, FlwrRun]]:
    run = start_run(workdir, "killed", cache_dir)
    try:
        run.wait_for(f"round {KILL_AFTER_ROUND}'s checkpoint", lambda: run.checkpoint_round() >= KILL_AFTER_ROUND)
        run.kill()  # SIGKILL the whole session: nobody gets to say the run ended
        yield run.folder, run
    finally:
        run.kill()


@pytest.fixture(scope="module")
def resumed(workdir, cache_dir, killed) -> Iterator[tuple[Path, FlwrRun]]:
    killed_folder, _ = killed
    run = start_run(workdir, "resumed", cache_dir, extra_config=f"resume-from='{killed_folder}'")
    try:
        yield finished_folder(run), run
    finally:
        run.kill()


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_uninterrupted_run_records_every_round(uninterrupted):
    folder, run = uninterrupted
    rows = completed(folder, run)
    assert [row["round"] for row in rows] == list(range(NUM_ROUNDS + 1))
    assert rows[0]["eval-accuracy"] is None and rows[0]["train-loss"] is None
    quality = ("central-accuracy", "central-loss", "eval-accuracy", "eval-loss", "train-loss")  # all but DP's epsilon
    assert all(row[key] is not None for row in rows[1:] for key in quality)
    # The comparisons below mean something only while the accuracy still moves every round.
    accuracies = [row["central-accuracy"] for row in rows]
    assert len(set(accuracies)) == len(accuracies), accuracies
    assert accuracies[-1] < 0.99, f"synthetic data saturates; the tolerance checks are weak: {accuracies}"
    for name in (CONFIG, CHECKPOINT, FINAL_MODEL, BEST_MODEL):
        assert (folder / name).is_file(), name
    assert read_json(folder / CONFIG)["num-server-rounds"] == NUM_ROUNDS


@pytest.mark.slow
def test_same_config_gives_the_same_rounds(uninterrupted, killed):
    """Two independent runs of one config agree round by round (the killed run, up to its kill)."""
    reference = by_round(completed(*uninterrupted))
    killed_folder, _ = killed
    rows = read_json(killed_folder / METRICS)
    assert [row["round"] for row in rows][: KILL_AFTER_ROUND + 1] == list(range(KILL_AFTER_ROUND + 1))
    for row in rows:
        assert_same_numbers(row, reference[row["round"]])
        if row["round"] > 0:
            assert row["train-loss"] == pytest.approx(reference[row["round"]]["train-loss"], rel=1e-3)


@pytest.mark.slow
def test_killed_run_leaves_a_loadable_checkpoint(killed):
    folder, _ = killed
    raw = torch.load(folder / CHECKPOINT, map_location="cpu", weights_only=True)
    checkpoint = Checkpoint.load(folder)
    assert checkpoint.round == raw["round"] >= KILL_AFTER_ROUND
    assert [row.round for row in checkpoint.rows] == list(range(checkpoint.round + 1))
    Net().load_state_dict(checkpoint.weights)
    # Nobody got to say it ended: the status stays "running" and there is no final model...
    assert read_json(folder / STATUS)["status"] == "running"
    assert not (folder / FINAL_MODEL).exists()
    # ...but a reader sees that the process that wrote it is gone.
    status = read_status(folder)
    assert status.state == "interrupted", status
    assert f"process {status.pid}" in status.why and "gone" in status.why, status.why


@pytest.mark.slow
def test_resume_continues_where_the_kill_stopped(uninterrupted, killed, resumed):
    reference = by_round(completed(*uninterrupted))
    killed_folder, _ = killed
    killed_round = Checkpoint.load(killed_folder).round
    killed_rows = rows_to_json(Checkpoint.load(killed_folder).rows)
    folder, run = resumed
    assert folder != killed_folder
    rows = completed(folder, run)
    assert [row["round"] for row in rows] == list(range(NUM_ROUNDS + 1)), "each round exactly once"
    assert rows[: killed_round + 1] == killed_rows, "the killed run's rounds are carried over unchanged"
    for row in rows[killed_round + 1 :]:
        assert_same_numbers(row, reference[row["round"]])
    config = read_json(folder / CONFIG)
    assert Path(config["resume-from"]).resolve() == killed_folder.resolve()
    assert (folder / FINAL_MODEL).is_file()
    assert Checkpoint.load(folder).round == NUM_ROUNDS


@pytest.mark.slow
def test_run_folder_has_plots(uninterrupted, resumed):
    for folder, _ in (uninterrupted, resumed):
        curves_w, curves_h = png_size(folder / plots.CURVES)
        samples_w, samples_h = png_size(folder / plots.SAMPLES)
        assert curves_w > 600 and curves_h > 300
        assert samples_w > 600 and samples_h > 300
        assert not list(folder.glob(".*.tmp")), "a temporary file was left behind"


# --------------------------------------------------------------------------- plots, in process


def metrics_rows(rounds: int) -> list[RoundRow]:
    rows = [RoundRow(round=0, central_accuracy=0.1, central_loss=2.3, seconds=1.0)]
    for r in range(1, rounds + 1):
        rows.append(
            RoundRow(
                round=r,
                central_accuracy=0.1 + 0.1 * r,
                central_loss=2.3 - 0.2 * r,
                eval_accuracy=0.12 + 0.1 * r,
                eval_loss=2.2 - 0.2 * r,
                train_loss=2.1 - 0.2 * r,
                seconds=1.0,
            )
        )
    return rows


@pytest.mark.parametrize(
    "rows",
    [
        metrics_rows(3),
        metrics_rows(0),  # round 0 only: eval/train values are all None
        [],  # before round 0 is recorded
        [
            *metrics_rows(1),
            RoundRow(round=2, central_accuracy=0.3, central_loss=math.nan, train_loss=math.inf, seconds=1.0),
        ],  # a failed evaluation
    ],
    ids=["rounds", "round-0-only", "empty", "missing-and-nonfinite"],
)
def test_write_curves_handles_missing_values(tmp_path, rows):
    path = tmp_path / plots.CURVES
    plots.write_curves(path, rows)
    width, height = png_size(path)
    assert width > 600 and height > 300
    drawn = curve_pixels(path)
    assert (drawn > 50) if rows else (drawn == 0), f"{drawn} pixels of the central-accuracy/-loss colour"
    assert [p.name for p in tmp_path.iterdir()] == [plots.CURVES]  # written atomically, nothing left over


def test_write_samples_grid(tmp_path):
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(40) % 10
    plots.write_samples(tmp_path / "full.png", ImageTensors(images, labels), [f"class {i}" for i in range(10)])
    plots.write_samples(tmp_path / "few.png", ImageTensors(images[:5], labels[:5]), ["only one name"])
    assert png_size(tmp_path / "full.png")[0] > 600
    assert png_size(tmp_path / "few.png")[0] > 600
    # Random images fill 40 tiles with thousands of colours; a blank or text-only figure has a handful.
    full, few = png_pixels(tmp_path / "full.png"), png_pixels(tmp_path / "few.png")
    colours = lambda pixels: len({tuple(p) for p in pixels.reshape(-1, 3)[::7]})  # noqa: E731
    assert colours(full) > 2000 and colours(full) > 2 * colours(few) > 200


def test_plot_failure_does_not_fail_the_round(tmp_path, monkeypatch, caplog):
    """finish_round still writes metrics and checkpoint when plotting raises; it logs a warning."""

    def broken(*_args, **_kwargs):
        raise RuntimeError("no fonts today")

    monkeypatch.setattr(recorder_module, "write_curves", broken)
    recorder = RunRecorder.start(tmp_path, RunConfig(), None)
    with caplog.at_level(logging.WARNING, logger=APP_LOGGER):
        recorder.finish_round(0, 2.3, 0.1, Net().state_dict())
    assert "could not write curves.png (RuntimeError: no fonts today)" in caplog.text
    assert read_json(tmp_path / METRICS)[0]["round"] == 0
    assert Checkpoint.load(tmp_path).round == 0
    assert not (tmp_path / plots.CURVES).exists()


def test_curves_refresh_every_round(tmp_path):
    recorder = RunRecorder.start(tmp_path, RunConfig(), None)
    recorder.finish_round(0, 2.3, 0.1, Net().state_dict())
    first = (tmp_path / plots.CURVES).read_bytes()
    recorder.add_client_metrics({"eval-accuracy": 0.3, "eval-loss": 2.0, "train-loss": 2.1})
    recorder.finish_round(1, 2.0, 0.3, Net().state_dict())
    assert (tmp_path / plots.CURVES).read_bytes() != first
