"""A run folder: its file names and format, making a new one, reading its rows back. Flower-free, torch-free.

Every file is written atomically (``files``), so a run killed at any moment leaves the previous
version intact, and each run gets a folder of its own that no other run, started in the same
second or not, can share. Folders carry ``RUN_FOLDER_FORMAT``; readers accept every earlier
format (format 1 had no version field).
"""

from __future__ import annotations

import errno
import json
import tempfile
from datetime import datetime
from pathlib import Path

from ..errors import ConfigError, RunFolderUnwritable
from ..files import write_problem
from .metrics import RoundRow

RUN_FOLDER_FORMAT = 2  # 2: format field, strict JSON metrics; 1: the first release
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"
CONFIG = "config.json"
FINAL_MODEL = "final_model.pt"
BEST_MODEL = "best_model.pt"


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
        except OSError as err:  # the probe passed a moment ago: the disk filled or went read-only since
            what, fix = write_problem(err)
            raise ConfigError(
                f"run-config output-dir={str(output_dir)!r}: cannot create the run folder {folder.name} there: "
                f"{what}; {fix}, or pass another output-dir"
            ) from None
    raise RuntimeError(f"could not create a run folder under {output_dir}")


def unwritable(
    path: Path, err: OSError, continue_command: str | None, checkpoint_round: int, *, all_rounds_done: bool = False
) -> RunFolderUnwritable:
    """The one line that ends a run whose folder can no longer be written: the file, the folder, why,
    the fix, and the command that continues from the last checkpoint (``continue_command``, from round
    ``checkpoint_round``; None when nothing was checkpointed, or when ``all_rounds_done``: every round
    is in checkpoint.pt, so the trained model is safe). Every file written before is whole: each was
    replaced atomically. A folder that is gone took its checkpoint with it: ``continue_command`` is then
    the one that continues from the run this one resumed, if any."""
    folder = path.parent
    if err.errno == errno.ENOENT and not folder.exists():
        gone = (
            f"cannot write {path.name}: the run folder {folder} is gone (deleted or moved during the run), "
            "and its checkpoint with it"
        )
        moved = "you moved the folder, resume from its new place (run-config resume-from)"
        if continue_command is None:
            return RunFolderUnwritable(path.name, gone, f"Start the run again, or, if {moved}")
        remedy = f"If {moved}; else continue from round {checkpoint_round} of the run this one resumed with: "
        return RunFolderUnwritable(path.name, gone, remedy + continue_command, continue_command)
    what, fix = write_problem(err)
    problem = f"cannot write {path.name} in the run folder {folder}: {what}; the files written before are whole"
    fix = fix[0].upper() + fix[1:]
    if all_rounds_done:
        remedy = (
            f"{fix} before the next run; no training is lost: every round is checkpointed, and {folder / CHECKPOINT} "
            f"holds the trained model of round {checkpoint_round} (missing: {FINAL_MODEL} and the plots)"
        )
    elif continue_command is None:
        remedy = f"{fix} or pass another output-dir, then start the run again (no round was checkpointed)"
    else:
        remedy = (
            f"{fix} or change output-dir below to another folder, then continue from the checkpoint of round "
            f"{checkpoint_round} with: {continue_command}"
        )
    return RunFolderUnwritable(path.name, problem, remedy, continue_command)


def read_rows(folder: Path) -> list[RoundRow]:
    """metrics.json of a run folder of any format; a damaged file is a one-line ConfigError."""
    path = Path(folder) / METRICS
    try:
        return [RoundRow.from_json(raw) for raw in json.loads(path.read_text())]
    except FileNotFoundError:
        return []
    except OSError as err:
        raise ConfigError(f"{path} cannot be read ({err.strerror}); make it readable") from None
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(
            f"{path} cannot be read ({type(err).__name__}: {err}); it is not a metrics file this app wrote"
        ) from None
