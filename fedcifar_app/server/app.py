"""ServerApp: the thin Flower entry point. ``main`` turns errors into one line and a status;
``server.run`` does the work (validate, check the nodes' data, run the strategy, record each round).

Nothing heavy is imported here, only inside ``main``: flower-simulation loads this module and the
ClientApp under one lock (Flower 1.25's ``object_ref._import_lock``) and starts Ray only after both,
so torch imported at module level here held Ray back by ~2 s of every start-up (benchmarks/README.md).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from ..compat import RunNotRunningException
from ..errors import ConfigError, DataError, RunAborted, RunFolderUnwritable, RunStopped
from ..logs import APP_LOGGER
from ..runs.run_log import run_log
from .stopping import BY_FLWR_STOP, RunStop

app = ServerApp()
logger = logging.getLogger(APP_LOGGER)

USER_ERRORS = (ConfigError, DataError, RunAborted)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation; a user error ends it with one ERROR line and a failed status, no traceback;
    a stop (Ctrl-C, SIGTERM, `flwr stop`) with status "stopped", recorded when it came (see stopping)."""
    from ..config import output_dir_of
    from ..runs.folder import create_run_folder
    from .run import run_federation

    with flower_logs(verbose=context.run_config.get("verbose") is True), contextlib.ExitStack() as logs:
        folder = None
        stop = RunStop()
        try:
            folder = create_run_folder(output_dir_of(context.run_config))
            logs.enter_context(run_log(folder))
            run_federation(grid, context, folder, stop)
        except RunStopped:
            pass  # status and the resume line were written when the stop came
        except RunNotRunningException:
            stop.request(BY_FLWR_STOP)
            raise  # Flower's flwr-serverapp ends a stopped run on this
        except USER_ERRORS as err:
            line, recorded = str(err), False
            if folder is not None and not stop.requested:
                line, recorded = record_failure(folder, str(err), err)
            logger.error("%s", line)  # the run's one line; it says so when status.json could not take it
            if recorded:
                logger.info("Run folder (status: failed): %s", folder)
        except BaseException as err:
            if folder is not None and not stop.requested:  # after a stop, Flower exits by raising
                record_failure(folder, f"{type(err).__name__}: {err}")
            raise
        finally:
            stop.close()


def record_failure(folder: Path, message: str, err: BaseException | None = None) -> tuple[str, bool]:
    """Status "failed" with ``message``. Returns the run's error line and whether status.json has it: when
    status.json cannot be written (a full or read-only disk) the line says so, before the command to copy."""
    from ..files import write_problem
    from ..runs.status import STATUS, write_status

    extra = {"resume-command": err.resume_command} if isinstance(err, RunFolderUnwritable) else {}
    try:
        write_status(folder, "failed", message, **extra)
    except OSError as status_error:
        if not isinstance(err, RunFolderUnwritable):
            return f"{message}; status.json could not be written ({write_problem(status_error)[0]})", False
        if err.file_name == STATUS:  # the line says so already
            return message, False
        return err.with_note(f"; {STATUS} could not be updated either"), False
    return message, True


def lost_actor_tracebacks(record: logging.LogRecord) -> bool:
    """False for the ERROR lines (the exception, then its traceback) with which Flower's simulation
    engine logs every message sent to a lost Ray actor: the run names the lost host in one line."""
    from .hosts import ACTOR_LOST  # Flower-free but for the Message type; loaded once a run logs

    if record.levelno < logging.ERROR or record.module not in ("vce_api", "raybackend"):
        return True
    text = record.msg if isinstance(record.msg, str) else type(record.msg).__name__  # `log(ERROR, ex)`
    return ACTOR_LOST.search(text) is None


@contextlib.contextmanager
def flower_logs(verbose: bool) -> Iterator[None]:
    """Keep Flower's per-message INFO lines (and its tracebacks for lost Ray actors) out of the way
    unless ``verbose``; this app's lines stay."""
    flower = logging.getLogger("flwr")
    previous_flower, previous_ours = flower.level, logger.level
    logger.setLevel(logging.INFO)
    if not verbose:
        flower.setLevel(logging.WARNING)
        flower.addFilter(lost_actor_tracebacks)
    try:
        yield
    finally:
        flower.removeFilter(lost_actor_tracebacks)
        flower.setLevel(previous_flower)
        logger.setLevel(previous_ours)
