"""A `flwr run` and everything it starts (Ray daemons, actors), seen through /proc: the process
tree of a session, its memory (RSS, and PSS with shared pages split) and CPU, and ending it."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, session id) for every process we can read."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()
            table[int(entry.name)] = (int(fields[1]), int(fields[3]))
        except (OSError, IndexError, ValueError):
            continue
    return table


def process_tree(root: int) -> set[int]:
    """``root``, its descendants, and anything else in its session (Ray daemons, actors)."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    tree, stack = set(), [root]
    while stack:
        pid = stack.pop()
        if pid in tree:
            continue
        tree.add(pid)
        stack.extend(children.get(pid, []))
    tree |= {pid for pid, (_, sid) in table.items() if sid == root}
    return tree


def _memory_kb(pid: int, field: str, path: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/{path}").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


class TreeMonitor:
    """Polls the run's process tree: peak summed RSS, and summed PSS (shared pages split) at peaks."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.peak_rss_kb = 0
        self.peak_pss_kb = 0
        self.peak_processes = 0
        self.seen: set[int] = set()
        self.at_peak: list[dict[str, Any]] = []
        self.cpu_ticks: dict[int, int] = {}  # pid -> utime + stime at its last poll
        self.names: dict[int, str] = {}
        self._last_pss = 0.0

    def cpu_by_process(self, top: int = 8) -> list[dict[str, Any]]:
        """Where the CPU went so far: the busiest processes."""
        tick = os.sysconf("SC_CLK_TCK")
        rows = sorted(self.cpu_ticks.items(), key=lambda item: -item[1])[:top]
        return [{"pid": pid, "name": self.names.get(pid, "?"), "cpu_s": round(t / tick, 1)} for pid, t in rows]

    def cpu_s(self) -> float:
        """CPU seconds the run's processes have used so far (user + system, all threads)."""
        return sum(self.cpu_ticks.values()) / os.sysconf("SC_CLK_TCK")

    def poll(self) -> None:
        pids = process_tree(self.root)
        self.seen |= pids
        for pid in pids:
            ticks = _cpu_ticks(pid)
            if ticks is not None:
                self.cpu_ticks[pid] = ticks
            if pid not in self.names:
                self.names[pid] = _name(pid)
        rss_of = {pid: _memory_kb(pid, "VmRSS:", "status") for pid in pids}
        rss = sum(rss_of.values())
        self.peak_processes = max(self.peak_processes, len(pids))
        now = time.monotonic()
        if rss > self.peak_rss_kb or now - self._last_pss > 2.0:
            self._last_pss = now
            pss_of = {pid: _memory_kb(pid, "Pss:", "smaps_rollup") for pid in pids}
            if sum(pss_of.values()) > self.peak_pss_kb:
                self.peak_pss_kb = sum(pss_of.values())
                # Where the memory is at the peak: the biggest processes by PSS.
                self.at_peak = sorted(
                    (
                        {"pid": pid, "name": _name(pid), "rss_mb": rss_of[pid] // 1024, "pss_mb": pss_of[pid] // 1024}
                        for pid in pids
                    ),
                    key=lambda row: -row["pss_mb"],
                )[:12]
        self.peak_rss_kb = max(self.peak_rss_kb, rss)


def _cpu_ticks(pid: int) -> int | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime, stime
    except (OSError, IndexError, ValueError):
        return None


def _name(pid: int) -> str:
    """A short name: the script or module a Python process runs, else the command."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    words = [a.decode(errors="replace") for a in argv if a]
    if not words:
        return _state(pid)
    for word in words[1:3]:
        if word.endswith(".py") or word.startswith("ray::") or "/bin/" in word:
            return Path(word).name
    return Path(words[0]).name[:40]


def end_tree(root: int, seen: Iterable[int]) -> None:
    """End the run's session, then any process of its tree still alive, by pid."""
    try:
        os.killpg(root, signal.SIGTERM)
    except ProcessLookupError:
        pass
    alive = [pid for pid in set(seen) | process_tree(root) if Path(f"/proc/{pid}").exists()]
    deadline = time.time() + 10
    while alive and time.time() < deadline:
        time.sleep(0.2)
        alive = [pid for pid in alive if Path(f"/proc/{pid}").exists() and _state(pid) != "Z"]
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "-"
