"""The run folder: config, per-round metrics, checkpoints, models and status. Flower-free.

Every file is written atomically (temporary file in the same folder, fsync, rename), so a
run killed at any moment leaves the previous version intact, and each run gets a folder of
its own that no other run, started in the same second or not, can share.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError, RunConfig
from .model import Net

logger = logging.getLogger("flwr.fedcifar_app")  # the app's log lines, shown even when Flower's are quiet

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"
STATUS = "status.json"
CONFIG = "config.json"
FINAL_MODEL = "final_model.pt"
BEST_MODEL = "best_model.pt"
METRIC_KEYS = ("central-accuracy", "central-loss", "eval-accuracy", "eval-loss", "train-loss")
# Keys whose change would make a resumed run a different experiment.
RESUME_MUST_MATCH = ("dataset", "partitioner", "dirichlet-alpha", "seed", "val-fraction")


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write-then-rename in the target's folder: readers see the old file or the new one, never half."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(payload)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, value: Any) -> None:
    atomic_write_bytes(path, (json.dumps(value, indent=2) + "\n").encode())


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
    """status.json: "running", "completed" or "failed" with the reason; scripts judge a run by it."""
    payload = {"status": status, "reason": reason, "updated": datetime.now().isoformat(timespec="seconds")}
    payload.update(extra)
    atomic_write_json(folder / STATUS, payload)


@dataclass
class Checkpoint:
    """What the next round needs: the global weights, the metrics so far and the best round."""

    round: int
    weights: dict[str, torch.Tensor]
    metrics: list[dict[str, Any]]
    best_accuracy: float
    run_config: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "weights": self.weights,
            "metrics": self.metrics,
            "best-accuracy": self.best_accuracy,
            "run-config": self.run_config,
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
                metrics=list(raw["metrics"]),
                best_accuracy=float(raw["best-accuracy"]),
                run_config=dict(raw["run-config"]),
            )
        except Exception as err:  # a damaged or foreign file: say which and why
            raise ConfigError(f"{where}: {CHECKPOINT} cannot be read ({type(err).__name__}: {err})") from None
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
        current = config.to_run_config()
        for key in RESUME_MUST_MATCH:
            if current[key] != self.run_config.get(key):
                raise ConfigError(
                    f"run-config {key}={current[key]!r} differs from the resumed run's "
                    f"{key}={self.run_config.get(key)!r}: pass the same value (see its config.json) to resume"
                )
        if config.num_server_rounds <= self.round:
            raise ConfigError(
                f"run-config num-server-rounds={config.num_server_rounds} but the resumed run already completed "
                f"round {self.round}: pass num-server-rounds greater than {self.round}"
            )


@dataclass
class RunRecorder:
    """Collects one row per round and writes metrics, checkpoint and models as rounds finish.

    ``round_offset`` is the round a resumed run starts after, so the strategy's local round
    numbers map to the run's global ones.
    """

    folder: Path
    run_config: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    round_offset: int = 0
    best_accuracy: float = -1.0
    pending: dict[str, Any] = field(default_factory=dict)
    round_started: float = field(default_factory=time.monotonic)

    @classmethod
    def start(cls, folder: Path, config: RunConfig, resumed: Checkpoint | None) -> RunRecorder:
        run_config = config.to_run_config()
        recorder = cls(folder=folder, run_config=run_config)
        atomic_write_json(folder / CONFIG, run_config)
        if resumed is not None:
            recorder.rows = [row for row in resumed.metrics if row["round"] <= resumed.round]
            recorder.round_offset = resumed.round
            recorder.best_accuracy = resumed.best_accuracy
            atomic_write_json(folder / METRICS, recorder.rows)
        recorder.set_status("running")
        return recorder

    def to_global(self, local_round: int) -> int:
        return local_round + self.round_offset

    def set_status(self, status: str, reason: str = "", **extra: Any) -> None:
        write_status(self.folder, status, reason, **extra)

    def begin_round(self) -> None:
        self.round_started = time.monotonic()
        self.pending = {}

    def record(self, metrics: Mapping[str, float]) -> None:
        """Aggregated client metrics of the round in progress (train or evaluate)."""
        self.pending.update({k: float(v) for k, v in metrics.items()})

    def finish_round(
        self, round_number: int, central_loss: float, central_accuracy: float, weights: dict[str, torch.Tensor]
    ) -> dict[str, Any]:
        """Append the round's row, then checkpoint: a kill between the two re-runs this round, never skips it."""
        row: dict[str, Any] = {
            "round": round_number,
            "central-accuracy": central_accuracy,
            "central-loss": central_loss,
        }
        for key in ("eval-accuracy", "eval-loss", "train-loss"):
            row[key] = self.pending.get(key)
        row["seconds"] = round(time.monotonic() - self.round_started, 3)
        self.rows.append(row)
        atomic_write_json(self.folder / METRICS, self.rows)
        if central_accuracy > self.best_accuracy:
            self.best_accuracy = central_accuracy
            atomic_torch_save(self.folder / BEST_MODEL, weights)
        checkpoint = Checkpoint(round_number, weights, self.rows, self.best_accuracy, self.run_config)
        atomic_torch_save(self.folder / CHECKPOINT, checkpoint.to_dict())
        self.write_curves()
        self.begin_round()
        return row

    def write_curves(self) -> None:
        """Refresh curves.png from the rows so far; a plotting failure is a warning, never a failed run."""
        try:
            from .plots import CURVES, write_curves  # here: plots imports this module

            write_curves(self.folder / CURVES, self.rows)
        except Exception as err:  # matplotlib missing or broken must not cost a run
            logger.warning("could not write curves.png (%s: %s); the run goes on", type(err).__name__, err)

    def finish_run(self, weights: dict[str, torch.Tensor]) -> None:
        atomic_torch_save(self.folder / FINAL_MODEL, weights)
        self.set_status(
            "completed", rounds=self.rows[-1]["round"] if self.rows else 0, best_central_accuracy=self.best_accuracy
        )


def format_row(row: Mapping[str, Any]) -> str:
    """One line per round: what a person watching the run wants to see."""

    def fmt(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    return (
        f"round {row['round']:>3}  central-acc {fmt(row['central-accuracy'], '.4f')}  "
        f"central-loss {fmt(row['central-loss'], '.4f')}  eval-acc {fmt(row['eval-accuracy'], '.4f')}  "
        f"train-loss {fmt(row['train-loss'], '.4f')}  {row['seconds']:6.1f}s"
    )


def summary_table(rows: list[Mapping[str, Any]]) -> str:
    """The per-round table printed at the end of a run."""
    header = f"{'round':>5} | {'central-acc':>11} | {'central-loss':>12} | {'eval-acc':>8} | {'eval-loss':>9} | {'train-loss':>10} | {'seconds':>7}"
    lines = [header, "-" * len(header)]
    for row in rows:
        cells = [
            f"{row['round']:>5}",
            *(
                f"{'-' if row[k] is None else format(row[k], '.4f'):>{w}}"
                for k, w in (
                    ("central-accuracy", 11),
                    ("central-loss", 12),
                    ("eval-accuracy", 8),
                    ("eval-loss", 9),
                    ("train-loss", 10),
                )
            ),
            f"{row['seconds']:>7.1f}",
        ]
        lines.append(" | ".join(cells))
    return "\n".join(lines)
