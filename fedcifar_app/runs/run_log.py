"""run.log: the run's own log lines, kept in its run folder so a stopped or failed run can be read later.

It holds every line of the app's logger (``logs.APP_LOGGER``) and Flower's warnings and errors
of the same process; each line is flushed as it is written, so a killed run keeps all it said.
run.log is a copy of what the terminal (or `flwr log`) shows: when it cannot be written (a full
disk, a read-only file system) that is one warning, never a traceback, and the run goes on.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

from ..files import write_problem
from ..logs import APP_LOGGER

RUN_LOG = "run.log"
logger = logging.getLogger(APP_LOGGER)


class _RunLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.startswith(APP_LOGGER) or record.levelno >= logging.WARNING


class RunLogHandler(logging.FileHandler):
    """A FileHandler that stops at its first failed write with one warning (to the other handlers),
    where logging's own handler would print a traceback for every line."""

    failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        err = sys.exc_info()[1]
        if not isinstance(err, OSError):  # not a write failure (a bad format argument): logging's own report
            super().handleError(record)
            return
        if not self.failed:
            self.failed = True  # first: the warning below passes through this handler too
            logger.warning(
                "%s cannot be written (%s); the run goes on, its log lines only here",
                self.baseFilename,
                write_problem(err)[0],
            )


@contextlib.contextmanager
def run_log(folder: Path) -> Iterator[Path]:
    """Copy the run's lines into ``folder/run.log`` while the block runs."""
    path = Path(folder) / RUN_LOG
    try:
        handler = RunLogHandler(path, encoding="utf-8")
    except OSError as err:
        logger.warning("%s cannot be written (%s); the run goes on without it", path, write_problem(err)[0])
        yield path
        return
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    handler.addFilter(_RunLines())
    flower = logging.getLogger("flwr")  # the app's logger propagates here; so do Flower's own lines
    flower.addHandler(handler)
    try:
        yield path
    finally:
        flower.removeHandler(handler)
        with contextlib.suppress(OSError):  # closing flushes; a full disk has been reported already
            handler.close()
