"""The run's record, round by round: metrics.json rows, best model, checkpoint, curves and status.

What a resume needs (config.json, metrics.json, the models, checkpoint.pt, status.json) must be written:
a write that fails (a full disk, a quota, a read-only file system, the folder deleted) ends the run with
one line naming the file, the folder, the fix and the command that continues from the last checkpoint
(``RunFolderUnwritable``). The pictures (curves.png, samples.png), TensorBoard scalars and run.log are
conveniences: their failures are warnings and the run goes on.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import RunConfig
from ..errors import TrainingDiverged
from ..files import atomic_write_json
from ..logs import APP_LOGGER
from ..training import weights_are_finite
from .checkpoint import Checkpoint, atomic_torch_save
from .folder import BEST_MODEL, CHECKPOINT, CONFIG, FINAL_MODEL, METRICS, unwritable
from .metrics import EPSILON, EVAL_ACCURACY, EVAL_LOSS, TRAIN_LOSS, RoundRow, rows_to_json
from .plots import CURVES, write_curves
from .status import STATUS, stale_after, write_status

logger = logging.getLogger(APP_LOGGER)


@dataclass
class RunRecorder:
    """One round's record, start to end: client metrics as they arrive, then the central
    evaluation closes the round (metrics.json row, best model, checkpoint, curves).

    Rounds are numbered for the whole run: a resumed run's strategy counts from 1 again, and
    ``global_round`` adds ``round_offset`` (the round the resumed run had finished).
    """

    folder: Path
    run_config: dict[str, Any]
    rows: list[RoundRow] = field(default_factory=list)
    round_offset: int = 0
    best_accuracy: float = -1.0
    pending: dict[str, float] = field(default_factory=dict)
    round_started: float = field(default_factory=time.monotonic)
    # The strategy's state at the end of a round, saved in each checkpoint (see server.strategy_builder.server_state).
    server_state: Callable[[], dict[str, Any]] = dict
    stale_after_s: float | None = None  # recorded in status.json: when a silent "running" is interrupted
    status: str = ""
    checkpointed_round: int = -1  # what a resume continues from; -1 before round 0's checkpoint
    # The stop watcher thread and Flower's signal handler (which may interrupt a write) write status too.
    status_lock: Any = field(default_factory=threading.RLock)
    # The command that continues the run from a round's checkpoint (None: nothing to continue from); named
    # when the folder can no longer be written (server.stopping.continue_command for this run).
    continue_command: Callable[[int], str | None] = lambda last_round: None

    @classmethod
    def start(
        cls,
        folder: Path,
        config: RunConfig,
        resumed: Checkpoint | None,
        continue_command: Callable[[int], str | None] | None = None,
    ) -> RunRecorder:
        run_config = config.to_run_config()
        recorder = cls(
            folder=folder,
            run_config=run_config,
            stale_after_s=stale_after(config.node_wait_timeout, config.round_timeout),
        )
        if continue_command is not None:
            recorder.continue_command = continue_command
        with recorder.writing(CONFIG) as path:
            atomic_write_json(path, run_config)
        if resumed is not None:
            recorder.rows = [row for row in resumed.rows if row.round <= resumed.round]
            recorder.round_offset = resumed.round
            recorder.best_accuracy = resumed.best_accuracy
            with recorder.writing(METRICS) as path:
                atomic_write_json(path, rows_to_json(recorder.rows))
        recorder.set_status("running")
        return recorder

    @contextlib.contextmanager
    def writing(self, name: str) -> Iterator[Path]:
        """Write the run folder's file ``name`` in the block; an OSError becomes the run's last line
        (``RunFolderUnwritable``: the file, the folder, the fix, the command that continues)."""
        path = self.folder / name
        try:
            yield path
        except OSError as err:
            # -1: nothing checkpointed here (or the folder is gone, its checkpoint with it); a resumed run
            # then continues from its source's round.
            last = self.last_round if self.folder.is_dir() else -1
            checkpoint_round = last if last >= 0 else self.round_offset
            done = checkpoint_round >= self.run_config["num-server-rounds"]
            command = self.continue_command(last)
            raise unwritable(path, err, command, checkpoint_round, all_rounds_done=done) from None

    def global_round(self, local_round: int) -> int:
        return local_round + self.round_offset

    @property
    def last_round(self) -> int:
        """The last round whose checkpoint is written (a stop may come between a round's row and its
        checkpoint); -1 before round 0."""
        return self.checkpointed_round

    def set_status(self, status: str, reason: str = "", **extra: Any) -> None:
        """Write status.json; once a run is stopped, only a later "stopped" (a newer round) replaces it."""
        with self.status_lock:
            if self.status == "stopped" and status != "stopped":
                return
            if self.stale_after_s is not None:
                extra.setdefault("stale-after-s", self.stale_after_s)
            with self.writing(STATUS):
                write_status(self.folder, status, reason, **extra)
            self.status = status

    def refresh_status(self) -> None:
        """A live run's heartbeat: "running" with a new update time (see runs.status for the rule)."""
        if self.status == "running":
            self.set_status("running", rounds=self.last_round)

    def begin_round(self) -> None:
        self.round_started = time.monotonic()
        self.pending = {}
        self.refresh_status()

    def add_client_metrics(self, metrics: Mapping[str, float]) -> None:
        """Aggregated client metrics of the round in progress (train or evaluate)."""
        self.pending.update({key: float(value) for key, value in metrics.items()})

    def finish_round(
        self, local_round: int, central_loss: float, central_accuracy: float, weights: dict[str, torch.Tensor]
    ) -> RoundRow:
        """Append the round's row, then checkpoint: a kill between the two re-runs this round, never skips it.

        A non-finite loss or weight records nothing, so the last checkpoint stays the last finite model.
        """
        round_number = self.global_round(local_round)
        weights_finite = weights_are_finite(weights)
        if not (math.isfinite(central_loss) and weights_finite):
            raise TrainingDiverged(
                f"round {round_number}: the global model's central-loss is {central_loss} "
                f"(weights {'' if weights_finite else 'not '}finite): training diverged"
            )
        row = RoundRow(
            round=round_number,
            central_accuracy=central_accuracy,
            central_loss=central_loss,
            eval_accuracy=self.pending.get(EVAL_ACCURACY),
            eval_loss=self.pending.get(EVAL_LOSS),
            train_loss=self.pending.get(TRAIN_LOSS),
            seconds=round(time.monotonic() - self.round_started, 3),
            epsilon=self.pending.get(EPSILON),
        )
        self.rows.append(row)
        with self.writing(METRICS) as path:
            atomic_write_json(path, rows_to_json(self.rows))
        if central_accuracy > self.best_accuracy:
            with self.writing(BEST_MODEL) as path:
                atomic_torch_save(path, weights)
            self.best_accuracy = central_accuracy
        checkpoint = Checkpoint(
            round_number, weights, self.rows, self.best_accuracy, self.run_config, self.server_state()
        )
        with self.writing(CHECKPOINT) as path:
            atomic_torch_save(path, checkpoint.to_dict())
        self.checkpointed_round = round_number
        self.write_curves()
        self.begin_round()
        return row

    def write_curves(self) -> None:
        """Refresh curves.png from the rows so far; a plotting failure is a warning, never a failed run."""
        try:
            write_curves(self.folder / CURVES, self.rows)
        except Exception as err:  # a broken matplotlib must not cost a run
            logger.warning("could not write curves.png (%s: %s); the run goes on", type(err).__name__, err)

    def finish_run(self, weights: dict[str, torch.Tensor]) -> None:
        with self.writing(FINAL_MODEL) as path:
            atomic_torch_save(path, weights)
        self.set_status(
            "completed",
            rounds=self.rows[-1].round if self.rows else 0,
            best_central_accuracy=self.best_accuracy,
        )
