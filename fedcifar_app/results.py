"""The run folder: config, per-round metrics, checkpoints, models and status. Flower-free.

Every file is written atomically (``files``), so a run killed at any moment leaves the
previous version intact, and each run gets a folder of its own that no other run, started
in the same second or not, can share. Folders carry ``RUN_FOLDER_FORMAT``; readers accept
every earlier format (format 1 had no version field).
"""

from __future__ import annotations

import io
import json
import logging
import math
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError, RunConfig
from .errors import TrainingDiverged
from .files import atomic_write_bytes, atomic_write_json
from .metrics import EPSILON, EVAL_ACCURACY, EVAL_LOSS, TRAIN_LOSS, RoundRow, rows_to_json
from .model import Net
from .plots import CURVES, write_curves
from .run_status import STATUS, RunStatus, read_status, stale_after, this_process, timestamp
from .training import weights_are_finite

__all__ = ["Checkpoint", "RunRecorder", "RunStatus", "read_status", "write_status"]

logger = logging.getLogger("flwr.fedcifar_app")  # the app's log lines, shown even when Flower's are quiet

RUN_FOLDER_FORMAT = 2  # 2: format field, strict JSON metrics; 1: the first release
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"
CONFIG = "config.json"
FINAL_MODEL = "final_model.pt"
BEST_MODEL = "best_model.pt"
# Keys whose change would make a resumed run a different experiment.
RESUME_MUST_MATCH = ("dataset", "partitioner", "dirichlet-alpha", "seed", "val-fraction", "strategy", "dp")


def atomic_torch_save(path: Path, value: Any) -> None:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def create_run_folder(output_dir: Path) -> Path:
    """A new ``<output-dir>/<timestamp>`` folder; ``mkdir`` is atomic, so a clash takes a suffix."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=output_dir, prefix=".write-test-")
        probe.close()
    except OSError as err:
        raise ConfigError(
            f"run-config output-dir={str(output_dir)!r} cannot be written ({err.strerror}): "
            "pass a folder you can write to"
        ) from None
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for attempt in range(1, 1000):
        folder = output_dir / (stamp if attempt == 1 else f"{stamp}-{attempt}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a run folder under {output_dir}")


def write_status(folder: Path, status: str, reason: str = "", **extra: Any) -> None:
    """status.json: "running", "completed", "failed" or "stopped" with the reason; scripts judge a run
    by it (``read_status``). The writing process is recorded so a reader can tell a dead "running"."""
    payload = {
        "status": status,
        "reason": reason,
        "updated": timestamp(),
        "format": RUN_FOLDER_FORMAT,
        **this_process(),
    }
    payload.update(extra)
    atomic_write_json(folder / STATUS, payload)


def read_rows(folder: Path) -> list[RoundRow]:
    """metrics.json of a run folder of any format; a damaged file is a one-line ConfigError."""
    path = Path(folder) / METRICS
    try:
        return [RoundRow.from_json(raw) for raw in json.loads(path.read_text())]
    except FileNotFoundError:
        return []
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(
            f"{path} cannot be read ({type(err).__name__}: {err}); it is not a metrics file this app wrote"
        ) from None


@dataclass
class Checkpoint:
    """What the next round needs: the global weights, the metrics so far and the best round."""

    round: int
    weights: dict[str, torch.Tensor]
    rows: list[RoundRow]
    best_accuracy: float
    run_config: dict[str, Any]
    # What the server strategy carries between rounds (optimizer moments, privacy accountant); tensors,
    # lists and numbers only, so weights_only loading reads it. Older checkpoints have none: {}.
    server_state: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": RUN_FOLDER_FORMAT,
            "round": self.round,
            "weights": self.weights,
            "metrics": rows_to_json(self.rows),
            "best-accuracy": self.best_accuracy,
            "run-config": self.run_config,
            "server-state": self.server_state,
        }

    @classmethod
    def load(cls, run_folder: Path) -> Checkpoint:
        """Read a run folder's checkpoint with ``weights_only=True``; anything unusable is a ConfigError."""
        where = f"run-config resume-from={str(run_folder)!r}"
        path = run_folder / CHECKPOINT
        if not run_folder.is_dir() or not path.exists():
            raise ConfigError(
                f"{where} is not a run folder with a {CHECKPOINT}: pass a folder under output-dir "
                "that a run wrote (it holds checkpoint.pt, metrics.json, status.json)"
            )
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
            checkpoint = cls(
                round=int(raw["round"]),
                weights=dict(raw["weights"]),
                rows=[RoundRow.from_json(row) for row in raw["metrics"]],
                best_accuracy=float(raw["best-accuracy"]),
                run_config=dict(raw["run-config"]),
                server_state=dict(raw.get("server-state", {})),
            )
        except Exception as err:  # a damaged or foreign file: say which and why, in one line
            detail = (str(err).strip().splitlines() or [""])[0][:200]
            raise ConfigError(
                f"{where}: {path} cannot be read ({type(err).__name__}: {detail}); it is damaged or not "
                "a checkpoint of this app: resume from another run folder (the file is left as it is)"
            ) from None
        try:
            Net().load_state_dict(checkpoint.weights)
        except RuntimeError as err:
            first = str(err).strip().splitlines()[-1].strip()
            raise ConfigError(
                f"{where}: {CHECKPOINT} holds a model of another shape ({first}); resume only runs of this app's model"
            ) from None
        return checkpoint

    def check_compatible(self, config: RunConfig) -> None:
        """A resumed run must continue the same experiment and have rounds left to run."""
        current, defaults = config.to_run_config(), RunConfig().to_run_config()
        for key in RESUME_MUST_MATCH:
            theirs = self.run_config.get(key, defaults[key])  # a key newer than the folder: it ran the default
            if current[key] != theirs:
                raise ConfigError(
                    f"run-config {key}={current[key]!r} differs from the resumed run's "
                    f"{key}={theirs!r}: pass the same value (see its config.json) to resume"
                )
        if config.num_server_rounds <= self.round:
            raise ConfigError(
                f"run-config num-server-rounds={config.num_server_rounds} but the resumed run already completed "
                f"round {self.round}: pass num-server-rounds greater than {self.round}"
            )


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
    # The strategy's state at the end of a round, saved in each checkpoint (see strategies.server_state).
    server_state: Callable[[], dict[str, Any]] = dict
    stale_after_s: float | None = None  # recorded in status.json: when a silent "running" is interrupted
    status: str = ""
    checkpointed_round: int = -1  # what a resume continues from; -1 before round 0's checkpoint
    # The stop watcher thread and Flower's signal handler (which may interrupt a write) write status too.
    status_lock: Any = field(default_factory=threading.RLock)

    @classmethod
    def start(cls, folder: Path, config: RunConfig, resumed: Checkpoint | None) -> RunRecorder:
        run_config = config.to_run_config()
        recorder = cls(
            folder=folder,
            run_config=run_config,
            stale_after_s=stale_after(config.node_wait_timeout, config.round_timeout),
        )
        atomic_write_json(folder / CONFIG, run_config)
        if resumed is not None:
            recorder.rows = [row for row in resumed.rows if row.round <= resumed.round]
            recorder.round_offset = resumed.round
            recorder.best_accuracy = resumed.best_accuracy
            atomic_write_json(folder / METRICS, rows_to_json(recorder.rows))
        recorder.set_status("running")
        return recorder

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
            write_status(self.folder, status, reason, **extra)
            self.status = status

    def refresh_status(self) -> None:
        """A live run's heartbeat: "running" with a new update time (see run_status for the rule)."""
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
        if not (math.isfinite(central_loss) and weights_are_finite(weights)):
            raise TrainingDiverged(
                f"round {round_number}: the global model's central-loss is {central_loss} (weights not finite): "
                "training diverged"
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
        atomic_write_json(self.folder / METRICS, rows_to_json(self.rows))
        if central_accuracy > self.best_accuracy:
            self.best_accuracy = central_accuracy
            atomic_torch_save(self.folder / BEST_MODEL, weights)
        checkpoint = Checkpoint(
            round_number, weights, self.rows, self.best_accuracy, self.run_config, self.server_state()
        )
        atomic_torch_save(self.folder / CHECKPOINT, checkpoint.to_dict())
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
        atomic_torch_save(self.folder / FINAL_MODEL, weights)
        self.set_status(
            "completed",
            rounds=self.rows[-1].round if self.rows else 0,
            best_central_accuracy=self.best_accuracy,
        )
