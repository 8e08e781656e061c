"""TensorBoard scalars in the run folder, so ``tensorboard --logdir outputs`` shows runs side by side.

tensorboardX writes the event files (no TensorFlow, no server); it is imported on the first
row, not at start-up. A writer that fails (missing package, full disk) logs one warning and
stops writing: the run itself never fails for it. Flower-free.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..logs import APP_LOGGER
from .metrics import RoundRow

logger = logging.getLogger(APP_LOGGER)


class ScalarBoard:
    """One event file per run folder; each metrics.json column becomes a scalar tag, by round."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.writer: Any = None
        self.failed = False

    def add_row(self, row: RoundRow) -> None:
        if self.failed:
            return
        try:
            if self.writer is None:
                from tensorboardX import SummaryWriter

                self.writer = SummaryWriter(logdir=str(self.folder), flush_secs=10)
            for key in RoundRow.field_keys():
                value = row.get(key)
                if key != "round" and value is not None:
                    self.writer.add_scalar(key, value, global_step=row.round)
            self.writer.flush()
        except Exception as err:  # TensorBoard is a convenience; the run goes on without it
            self.failed = True
            logger.warning("TensorBoard scalars stop (%s: %s); the run goes on", type(err).__name__, err)

    def close(self) -> None:
        if self.writer is not None:
            try:
                self.writer.close()
            except Exception as err:
                logger.warning("TensorBoard writer did not close (%s: %s)", type(err).__name__, err)
            self.writer = None
