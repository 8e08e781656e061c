"""TensorBoard scalars: the event file holds every metrics.json column by round; a failing writer is a warning."""

from __future__ import annotations

import logging

from support.tensorboard import read_scalars

from fedcifar_app.logs import APP_LOGGER
from fedcifar_app.runs.board import ScalarBoard
from fedcifar_app.runs.metrics import RoundRow


def test_each_row_becomes_scalars_by_round(tmp_path):
    board = ScalarBoard(tmp_path)
    board.add_row(RoundRow(round=0, central_accuracy=0.1, central_loss=2.3, seconds=1.0))
    board.add_row(RoundRow(round=1, central_accuracy=0.5, central_loss=1.5, train_loss=1.9, seconds=2.0, epsilon=3.5))
    board.close()
    scalars = read_scalars(tmp_path)
    assert scalars["central-accuracy"] == [(0, 0.1), (1, 0.5)]
    assert scalars["central-loss"] == [(0, 2.3), (1, 1.5)]
    assert scalars["train-loss"] == [(1, 1.9)] and scalars["epsilon"] == [(1, 3.5)]
    assert "round" not in scalars and "eval-accuracy" not in scalars  # absent values are not written as 0


def test_a_writer_that_cannot_write_is_one_warning_and_the_run_goes_on(tmp_path, caplog):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    board = ScalarBoard(blocked)
    with caplog.at_level(logging.WARNING, logger=APP_LOGGER):
        board.add_row(RoundRow(round=0, central_accuracy=0.1))
        board.add_row(RoundRow(round=1, central_accuracy=0.2))
        board.close()
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "TensorBoard scalars stop" in warnings[0] and "the run goes on" in warnings[0]
