"""checkpoint.pt: what a resumed run continues from, saved and loaded with ``weights_only`` torch files."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import RESUME_MUST_MATCH, RunConfig
from ..errors import ConfigError, first_line
from ..files import atomic_write_bytes
from ..model import Net
from .folder import CHECKPOINT, RUN_FOLDER_FORMAT
from .metrics import RoundRow, rows_to_json


def atomic_torch_save(path: Path, value: Any) -> None:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    atomic_write_bytes(path, buffer.getvalue())


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
            raise ConfigError(
                f"{where}: {path} cannot be read ({type(err).__name__}: {first_line(err)}); it is damaged or not "
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
