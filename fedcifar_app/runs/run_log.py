"""run.log: the run's own log lines, kept in its run folder so a stopped or failed run can be read later.

It holds every line of the app's logger (``logs.APP_LOGGER``) and Flower's warnings and errors
of the same process; each line is flushed as it is written, so a killed run keeps all it said.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

from ..logs import APP_LOGGER

RUN_LOG = "run.log"


class _RunLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.startswith(APP_LOGGER) or record.levelno >= logging.WARNING


@contextlib.contextmanager
def run_log(folder: Path) -> Iterator[Path]:
    """Copy the run's lines into ``folder/run.log`` while the block runs."""
    path = Path(folder) / RUN_LOG
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    handler.addFilter(_RunLines())
    flower = logging.getLogger("flwr")  # the app's logger propagates here; so do Flower's own lines
    flower.addHandler(handler)
    try:
        yield path
    finally:
        flower.removeHandler(handler)
        handler.close()
