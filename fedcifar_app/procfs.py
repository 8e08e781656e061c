"""Other processes, read from Linux's /proc: the one reader of ``/proc/<pid>/stat``. Elsewhere every
function answers "unknown" (None or empty), and callers fall back to what they can do without it.

A process is known by its pid AND its start time (field 22 of stat, clock ticks since boot): a pid
that the kernel reused for a later process has another start time, so it is never mistaken for ours.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

PROC = Path("/proc")


class ProcStat(NamedTuple):
    """The fields of /proc/PID/stat that the app reads."""

    state: str  # R, S, D, Z (zombie: exited, not yet reaped), X (dead), ...
    parent: int
    process_group: int
    session: int
    threads: int
    start_ticks: int

    @property
    def alive(self) -> bool:
        """A zombie has exited; only its parent has not collected it yet."""
        return self.state not in ("Z", "X")


def parse_proc_stat(text: str) -> ProcStat:
    """Parse a stat line; the command name sits in parentheses and may hold spaces or ")"."""
    fields = text[text.rfind(")") + 2 :].split()
    return ProcStat(fields[0], int(fields[1]), int(fields[2]), int(fields[3]), int(fields[17]), int(fields[19]))


def read_proc_stat(pid: int, proc: Path = PROC) -> ProcStat | None:
    """``pid``'s stat, or None when it is gone (or off Linux)."""
    try:
        return parse_proc_stat((proc / str(pid) / "stat").read_text(encoding="utf-8"))
    except (OSError, IndexError, ValueError):
        return None


def process_start(pid: int) -> int | None:
    """``pid``'s start time while it runs; None when it is gone, a zombie, or unknown."""
    stat = read_proc_stat(pid)
    return stat.start_ticks if stat is not None and stat.alive else None


def all_processes(proc: Path = PROC) -> dict[int, ProcStat]:
    """Every process's stat by pid (empty off Linux); processes that end while this reads are left out."""
    try:
        pids = [int(entry.name) for entry in proc.iterdir() if entry.name.isdigit()]
    except OSError:
        return {}
    found = {}
    for pid in pids:
        stat = read_proc_stat(pid, proc)
        if stat is not None:
            found[pid] = stat
    return found


def descendants(root: int) -> list[tuple[int, int]]:
    """(pid, start time) of every live process below ``root``."""
    children: dict[int, list[int]] = {}
    stats = all_processes()
    for pid, stat in stats.items():
        children.setdefault(stat.parent, []).append(pid)
    found, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        if stats[pid].alive:
            found.append((pid, stats[pid].start_ticks))
        todo.extend(children.get(pid, []))
    return found


def command_line(pid: int, proc: Path = PROC) -> list[str] | None:
    """``pid``'s argv, or None when it is gone (or off Linux)."""
    try:
        raw = (proc / str(pid) / "cmdline").read_bytes()
    except OSError:
        return None
    return [word.decode(errors="replace") for word in raw.split(b"\0")[:-1]] or None


def session_members(session_id: int) -> list[int]:
    """Pids alive (not zombies) in session ``session_id``."""
    return [pid for pid, stat in all_processes().items() if stat.session == session_id and stat.alive]
