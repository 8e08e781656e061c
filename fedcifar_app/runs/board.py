"""TensorBoard scalars in the run folder, so ``tensorboard --logdir outputs`` shows runs side by side.

tensorboardX's event-file writer is used directly, in the caller's thread: its SummaryWriter writes
from a background thread and an exit hook, which on a full disk print tracebacks and, once that
thread has died, block the run when its queue fills. Here a writer that fails (missing package,
full disk, read-only folder) logs one warning and stops writing: the run itself never fails for
it. tensorboardX is imported on the first row, not at start-up. Flower-free.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any

from ..errors import first_line
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
            from tensorboardX.event_file_writer import EventsWriter
            from tensorboardX.proto.event_pb2 import Event
            from tensorboardX.summary import scalar

            if self.writer is None:  # the name TensorBoard looks for: events.out.tfevents.<time>.<host>
                self.writer = EventsWriter(str(self.folder / "events"))
            for key in RoundRow.field_keys():
                value = row.get(key)
                if key != "round" and value is not None:
                    self.writer.write_event(Event(wall_time=time.time(), step=row.round, summary=scalar(key, value)))
            self.writer.flush()
        except Exception as err:  # TensorBoard is a convenience; the run goes on without it
            self.failed = True
            self._drop_writer()
            logger.warning("TensorBoard scalars stop (%s: %s); the run goes on", type(err).__name__, first_line(err))

    def close(self) -> None:
        if self.writer is not None:
            try:
                self.writer.close()
            except Exception as err:
                logger.warning("TensorBoard writer did not close (%s: %s)", type(err).__name__, first_line(err))
            self.writer = None

    def _drop_writer(self) -> None:
        """Close a failed writer's file without another report (its unwritten bytes are lost)."""
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.close()
            self.writer = None
