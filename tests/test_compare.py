"""fedcifar-compare: the table's numbers, curves really drawn, old folders read, bad folders in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedcifar_app.runs import compare, plots
from fedcifar_app.runs.metrics import RoundRow, rows_to_json

BLUE, ORANGE = (31, 119, 180), (255, 127, 14)  # matplotlib's C0 and C1: the first two groups


def write_run(
    folder: Path, config: dict, accuracies: list[float], epsilons: list | None = None, status: dict | None = None
) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    status = status or {"status": "completed", "reason": "", "updated": "2026-01-01T12:00:00"}
    (folder / "status.json").write_text(json.dumps(status))
    rows = [
        RoundRow(
            round=i,
            central_accuracy=accuracy,
            central_loss=2.3 - accuracy,
            seconds=10.0,
            epsilon=epsilons[i] if epsilons else None,
        )
        for i, accuracy in enumerate(accuracies)
    ]
    raw = rows_to_json(rows)
    if epsilons is None:  # a folder written before epsilon existed
        for row in raw:
            row.pop("epsilon")
    (folder / "metrics.json").write_text(json.dumps(raw))
    return folder


def colour_pixels(path: Path, colour: tuple[int, int, int]) -> tuple[int, int]:
    """How many pixels of ``colour`` (a line colour) lie in the left and in the right half of the PNG."""
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    close = np.abs(pixels - np.array(colour)).sum(axis=2) < 40
    middle = pixels.shape[1] // 2
    return int(close[:, :middle].sum()), int(close[:, middle:].sum())


@pytest.fixture
def three_runs(tmp_path) -> list[Path]:
    old = {"num-server-rounds": 3, "seed": 1, "dataset": "synthetic", "output-dir": "a"}  # format 1: no strategy keys
    return [
        write_run(tmp_path / "r1", old, [0.1, 0.4, 0.6, 0.5]),
        write_run(
            tmp_path / "r2",
            {**old, "seed": 2, "strategy": "fedavg", "output-dir": "b"},
            [0.1, 0.3, 0.5, 0.7],
            # Its process died without a word on another machine, long ago: the table says interrupted.
            status={
                "status": "running",
                "reason": "",
                "updated": "2026-01-01T12:00:00+00:00",
                "host": "elsewhere",
                "pid": 4242,
                "stale-after-s": 1500,
            },
        ),
        write_run(
            tmp_path / "r3",
            {**old, "strategy": "fedprox", "proximal-mu": 0.1, "dp": "central"},
            [0.1, 0.2, 0.25, 0.3],
            epsilons=[None, 1.5, 2.25, 3.125],
        ),
    ]


@pytest.fixture
def compared(tmp_path, three_runs, monkeypatch, capsys) -> tuple[Path, str]:
    """fedcifar-compare on the three runs, --out left at its default (the current folder): the folder and
    what it printed."""
    monkeypatch.chdir(tmp_path)
    assert compare.main([str(folder) for folder in three_runs]) == 0
    return tmp_path, capsys.readouterr().out


def test_the_table_is_printed_and_written(compared):
    out, printed = compared
    assert printed.startswith((out / "comparison.md").read_text())


def test_each_run_is_labelled_by_the_keys_that_differ(compared):
    markdown = (compared[0] / "comparison.md").read_text()
    assert "Labels: the run-config keys that differ between the runs (strategy, seed, proximal-mu, dp)" in markdown
    assert "| strategy=fedavg seed=1 | r1 | completed | 0.5000 | 0.6000 | 2 | 40.0 | - |" in markdown
    assert "| strategy=fedavg seed=2 | r2 | interrupted | 0.7000 | 0.7000 | 3 | 40.0 | - |" in markdown
    row = "| strategy=fedprox seed=1 proximal-mu=0.1 dp=central | r3 | completed | 0.3000 | 0.3000 | 3 | 40.0 | 3.12 |"
    assert row in markdown


def test_runs_that_differ_only_in_seed_get_a_mean_and_deviation_row(compared):
    markdown = (compared[0] / "comparison.md").read_text()
    assert "| strategy=fedavg | 2 | 0.6000 ± 0.1414 | 0.6500 ± 0.0707 | 40.0 | - |" in markdown
    assert "| strategy=fedprox proximal-mu=0.1 dp=central | 1 | 0.3000 ± 0.0000 |" in markdown


def test_the_plot_draws_each_group_in_its_colour(compared):
    plot = compared[0] / "comparison.png"
    left, right = colour_pixels(plot, BLUE)  # the fedavg group: accuracy and loss
    assert left > 200 and right > 200
    assert min(colour_pixels(plot, ORANGE)) > 100  # the fedprox run


def test_the_pixel_check_fails_on_a_figure_without_curves(tmp_path):
    plots.write_comparison(tmp_path / "empty.png", [])
    assert colour_pixels(tmp_path / "empty.png", BLUE) == (0, 0)


def test_a_folder_that_is_not_a_run_fails_in_one_line_naming_it_and_the_fix(tmp_path, three_runs, capsys):
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    assert compare.main([str(three_runs[0]), str(empty), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert error == (
        f"fedcifar-compare: error: {empty} is not a run folder (no metrics.json): pass folders that a run "
        "wrote under output-dir, e.g. outputs/20260101-120000"
    )
    assert not (tmp_path / "out").exists()  # nothing written on bad input


def test_a_damaged_metrics_file_fails_in_one_line_naming_it(tmp_path, three_runs, capsys):
    (three_runs[1] / "metrics.json").write_text('[{"round": "x"')
    assert compare.main([str(three_runs[1]), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and str(three_runs[1] / "metrics.json") in error and f"leave {three_runs[1]} out" in error
    assert not (tmp_path / "out").exists()
