"""status.json's process fields, and reading a run folder's state back. Flower-free, torch-free.

A run that dies without a word (SIGKILL, power loss) cannot write "interrupted" itself, so its
status.json keeps saying "running". It records which process wrote it (pid, the process's start
time, host, boot) and when, and ``read_status`` turns a "running" whose writer is gone into
"interrupted":

- same host and boot: the process is gone, or its pid now belongs to a process that started at
  another time (a reused pid) -> interrupted;
- same host, another boot (a reboot since) -> interrupted;
- another host (or no ``/proc`` to look in): no update for longer than ``stale-after-s``, the
  longest a round can take (two stages of node-wait-timeout + round-timeout, plus a margin) ->
  interrupted.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..files import atomic_write_json
from ..procfs import PROC, process_start
from .folder import RUN_FOLDER_FORMAT

STATUS = "status.json"
STATES = ("running", "completed", "failed", "stopped", "interrupted")
STALE_MARGIN_S = 60.0  # central evaluation and file writes, on top of the waits a round may take


def boot_id() -> str:
    """This boot's id (Linux); empty where there is none."""
    try:
        return (PROC / "sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def this_process() -> dict[str, Any]:
    """The fields that let a reader tell whether the writer still runs."""
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "boot-id": boot_id(), "process-start": process_start(pid)}


def stale_after(node_wait_timeout: float, round_timeout: float) -> float:
    """Longest gap between two status updates of a live run: a round refreshes status.json at its start
    and end, and in between waits at most twice (train, evaluate) for nodes and for replies."""
    return 2 * (node_wait_timeout + round_timeout) + STALE_MARGIN_S


# For a folder that records no stale-after-s (older versions): a run at the default timeouts.
DEFAULT_STALE_AFTER_S = stale_after(RunConfig.node_wait_timeout, RunConfig.round_timeout)


def timestamp(now: float | None = None) -> str:
    """Local time with its UTC offset, so another host's reader compares it correctly."""
    return datetime.fromtimestamp(time.time() if now is None else now).astimezone().isoformat(timespec="seconds")


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


@dataclass(frozen=True)
class RunStatus:
    """What a run folder says, with "running" checked against the writing process.

    ``state`` is one of ``STATES``; ``recorded`` is what status.json holds; ``why`` explains an
    "interrupted" in one line.
    """

    state: str
    recorded: str
    reason: str
    updated: datetime | None
    pid: int | None
    host: str
    why: str
    raw: dict[str, Any]


def read_status(folder: Path, *, now: float | None = None) -> RunStatus:
    """A run folder's status; a "running" whose process is gone reads as "interrupted" (rule above).

    A folder without status.json (its run died before writing one) is "interrupted" too.
    """
    path = Path(folder) / STATUS
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return RunStatus("interrupted", "", "", None, None, "", f"{path} is missing", {})
    except ValueError as err:
        raise ValueError(f"{path} cannot be read ({err}); it is not a status file this app wrote") from None
    recorded = str(raw.get("status", ""))
    updated = _parse_time(raw.get("updated"))
    pid = raw.get("pid")
    host = str(raw.get("host", ""))
    why = ""
    if recorded == "running":
        why = _why_not_running(raw, updated, time.time() if now is None else now)
    state = "interrupted" if why else recorded
    return RunStatus(state, recorded, str(raw.get("reason", "")), updated, pid, host, why, raw)


def _why_not_running(raw: dict[str, Any], updated: datetime | None, now: float) -> str:
    """Empty if the writer of a "running" status may still run; else why it cannot."""
    pid, host, start = raw.get("pid"), raw.get("host"), raw.get("process-start")
    if pid is not None and host == socket.gethostname() and PROC.is_dir():
        if raw.get("boot-id") and raw.get("boot-id") != boot_id():
            return f"the machine restarted since process {pid} wrote it"
        current = process_start(int(pid))
        if current is None:
            return f"its process {pid} on this host is gone"
        if start is not None and current != start:
            return f"its process {pid} is gone (the pid now belongs to another process)"
        return ""
    limit = float(raw.get("stale-after-s", DEFAULT_STALE_AFTER_S))
    if updated is None:
        return "it records no update time"
    age = now - updated.timestamp()
    if age > limit:
        where = f"on host {host}" if host else "(no host recorded)"
        return f"no update for {age:.0f}s {where}, longer than a round can take ({limit:.0f}s)"
    return ""


def _parse_time(value: Any) -> datetime | None:
    """ISO time; one without an offset (run folder format 1 and 2) is this host's local time."""
    try:
        parsed = datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.astimezone()
