"""Stopping a run cleanly: who asked, recording it at once, and ending the run without waiting for the round.

Where a stop comes from, per Flower runtime (1.25; see compat for the hooks):

- ``flwr run .`` in simulation (``flower-simulation``): Ctrl-C or SIGTERM raise in its main thread,
  which sets the engine's stop event; a watcher thread here sees it. Ctrl-C also makes the ``flwr``
  CLI SIGKILL ``flower-simulation`` 0.25 s later (Python's ``subprocess.run``), so the stop is
  recorded the moment it is seen, the round in progress is abandoned, and the engine's processes
  (Ray) are ended here, since nothing else will end them. A signal to the ``flwr`` process alone
  leaves ``flower-simulation`` running without a parent: that is watched for too. Only processes
  below ``flower-simulation`` are ended, so a Ray cluster the run attached to (``ray start``, the
  ray-cluster federation) is never touched: its daemons are not ours, and Ray itself ends the run's
  actors once ``flower-simulation`` is gone (tests/test_cluster.py checks both).
- deployment (``flwr-serverapp``) and Flower >= 1.27: Flower's own signal handler (SIGINT, SIGTERM,
  or a heartbeat the SuperLink refused after ``flwr stop``) calls our exit handler, then exits.
- ``flwr stop`` in deployment: the next grid call raises ``RunNotRunningException``.

The first request wins; the last finished round's checkpoint is what a resume continues from.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from .. import compat
from ..config import RESUME_MUST_MATCH, RunConfig, absolute_path
from ..errors import RunStopped
from ..logs import APP_LOGGER
from ..procfs import command_line, descendants, process_start
from ..pyproject import format_overrides

logger = logging.getLogger(APP_LOGGER)

BY_SIGNAL_SIMULATION = "stopped by Ctrl-C or SIGTERM (the simulation engine shut down)"
BY_CLI_GONE = "stopped: `flwr run` ended under the simulation (SIGTERM or kill to the flwr process alone)"
BY_FLOWER_EXIT = "stopped: Flower ended the ServerApp process (`flwr stop`, or SIGINT/SIGTERM to it)"
BY_FLWR_STOP = "stopped by `flwr stop` (the SuperLink no longer runs this run)"
ALWAYS_IN_RESUME = ("num-server-rounds", "output-dir")


@dataclass
class RunStop:
    """One run's stop request. ``request`` records it at once through ``on_stop(who)``; the strategy
    and the grid call ``check`` and raise ``RunStopped``. After ``close`` (the run ended on its own)
    a late request changes nothing."""

    on_stop: Callable[[str], None] = lambda who: None
    event: threading.Event = field(default_factory=threading.Event)
    who: str = ""
    closed: bool = False
    lock: Any = field(default_factory=threading.RLock)  # re-entrant: Flower's signal handler may interrupt a holder
    engine_processes: list[tuple[int, int]] = field(default_factory=list)  # (pid, start) to end in simulation

    @property
    def requested(self) -> bool:
        return self.event.is_set()

    def request(self, who: str) -> None:
        """Stop the run and record it. The lock is held while ``on_stop`` records, so ``close`` (the run's
        last step before its run.log closes) waits for the record and its resume line."""
        with self.lock:
            if self.closed or self.event.is_set():
                return
            self.who = who
            self.event.set()
            try:
                self.on_stop(who)
            except Exception as err:  # recording must not hide the stop itself
                logger.warning("could not record the stop (%s: %s)", type(err).__name__, err)

    def check(self) -> None:
        if self.event.is_set():
            raise RunStopped(self.who)

    def close(self) -> None:
        """The run has ended: a later request changes nothing. Waits for a stop being recorded."""
        with self.lock:
            self.closed = True

    def listen(self, grid: Grid) -> Grid:
        """Hear stops from Flower (exit handler; in simulation the engine's stop event); return the grid
        to run the strategy on: one whose waits for replies end when the run is stopped, and which polls
        for them more often than Flower's deployment grid does (see ``StoppableGrid``)."""
        compat.add_exit_handler(lambda: self.request(BY_FLOWER_EXIT))
        engine_stop = compat.simulation_engine_stop_event()
        if engine_stop is None:  # deployment (and Flower >= 1.27): Flower's exit handler brings the stop
            return StoppableGrid(grid, self, poll_s=DEPLOYMENT_REPLY_POLL_S)
        self.engine_processes = descendants(os.getpid())
        threading.Thread(target=self._watch_engine, args=(engine_stop,), name="fedcifar-stop", daemon=True).start()
        threading.Thread(target=self._watch_parent, args=(os.getppid(),), name="fedcifar-parent", daemon=True).start()
        return StoppableGrid(grid, self)

    def at_round_boundary(self) -> None:
        """Between rounds: stop here if asked; note the engine's processes (Ray starts workers lazily)."""
        self.check()
        if self.engine_processes:
            self.engine_processes = descendants(os.getpid())

    def _watch_engine(self, engine_stop: threading.Event) -> None:
        engine_stop.wait()
        with self.lock:
            if self.closed:  # the engine stops after every run; only a stop mid-run counts
                return
        self.request(BY_SIGNAL_SIMULATION)
        end_processes(self.engine_processes + descendants(os.getpid()))

    def _watch_parent(self, parent: int, poll_s: float = 0.5) -> None:
        """``flower-simulation`` whose ``flwr run`` died (its parent changed) stops the run."""
        while not self.closed and not self.event.is_set():
            if os.getppid() != parent:
                self.request(BY_CLI_GONE)
                end_processes(self.engine_processes + descendants(os.getpid()))
                return
            time.sleep(poll_s)


def resume_command(config: RunConfig, folder: Path, *, simulation: bool, typed: list[str] | None = None) -> str:
    """The `flwr run` line that continues this run: every key that differs from the code's defaults,
    the round count and output folder, the keys a resume must match (restated whatever pyproject.toml
    says by then), and resume-from. ``typed`` (``typed_flwr_run``) is the command
    that started this simulation, less its run config: its federation and --federation-config are
    kept, so a run on a Ray cluster resumes there, not on the default federation."""
    current = config.to_run_config()
    defaults = RunConfig().to_run_config()
    always = (*ALWAYS_IN_RESUME, *RESUME_MUST_MATCH)
    keep = {key: value for key, value in current.items() if key in always or value != defaults.get(key)}
    keep["output-dir"] = str(absolute_path(config.output_dir))  # where this run wrote (not the resumed run)
    keep["resume-from"] = str(folder)
    if typed:
        start = " ".join(shell_word(word) for word in typed)
    else:
        start = "flwr run ." if simulation else "flwr run . <federation>"
    return f"{start} --run-config {shell_word(format_overrides(keep))}"


RUN_CONFIG_FLAGS = ("--run-config", "-c")


def typed_flwr_run(pid: int) -> list[str] | None:
    """``["flwr", "run", <app>, [<federation>], <other options>]`` from the argv of process ``pid`` when
    it is the `flwr run` CLI (the parent of ``flower-simulation``), without its run config; else None."""
    argv = command_line(pid)
    if not argv:
        return None
    starts = [i for i, word in enumerate(argv[:-1]) if os.path.basename(word) == "flwr" and argv[i + 1] == "run"]
    if not starts:
        return None
    words, rest = ["flwr", "run"], iter(argv[starts[0] + 2 :])
    for word in rest:
        if word in RUN_CONFIG_FLAGS:
            next(rest, None)
        elif not word.startswith(tuple(f"{flag}=" for flag in RUN_CONFIG_FLAGS)):
            words.append(word)
    return words


def shell_word(word: str) -> str:
    """``word`` as a shell reads it back: bare when safe, else in double quotes (as the run config is)."""
    if re.fullmatch(r"[\w@%+=:,./-]+", word):
        return word
    if not re.search(r'["\\$`!]', word):
        return f'"{word}"'
    return shlex.quote(word)


def continue_command(
    config: RunConfig, folder: Path, last_round: int, *, simulation: bool, typed: list[str] | None = None
) -> str | None:
    """The command that continues this run: from ``folder`` once it checkpointed a round (``last_round``
    >= 0), else from the folder this run resumed from; None when neither holds a checkpoint, or when
    every round is checkpointed (``all_rounds_checkpointed``: a resume would be refused, nothing is left
    to train). ``typed`` as in ``resume_command``."""
    if all_rounds_checkpointed(config, last_round):
        return None
    if last_round >= 0:
        return resume_command(config, folder, simulation=simulation, typed=typed)
    if config.resume_from:
        return resume_command(config, Path(config.resume_from), simulation=simulation, typed=typed)
    return None


def all_rounds_checkpointed(config: RunConfig, last_round: int) -> bool:
    """The run's last round is in checkpoint.pt: only the final files (final_model.pt, plots) are left."""
    return last_round >= config.num_server_rounds


# How often a deployed ServerApp asks the SuperLink for replies. Flower's GrpcGrid asks every 3 s
# (flwr/server/grid/grpc_grid.py, send_and_receive): a round waits that long after its last reply,
# twice (train, evaluate). 0.25 s took ~1 s off a warm deployed round for ~0.5 CPU-s of polling
# (benchmarks/README.md, "Deployment vs simulation").
DEPLOYMENT_REPLY_POLL_S = 0.25


class StoppableGrid(Grid):
    """Flower's grid, with waits for replies that end as soon as the run is stopped (the round in
    progress is abandoned, its replies dropped, instead of waited for until round-timeout) and that
    poll every ``poll_s``: the in-memory simulation grid is cheap to ask, the deployment grid asks the
    SuperLink over gRPC (``DEPLOYMENT_REPLY_POLL_S``)."""

    def __init__(self, grid: Grid, stop: RunStop, poll_s: float = 0.1) -> None:
        self._grid, self._stop, self._poll_s = grid, stop, poll_s

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def set_run(self, *args: Any, **kwargs: Any) -> None:
        self._grid.set_run(*args, **kwargs)

    @property
    def run(self) -> Any:
        return self._grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        self._stop.check()
        waiting = set(self._grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while True:
            self._stop.check()
            pulled = list(self._grid.pull_messages(waiting))
            replies.extend(pulled)
            waiting.difference_update(message.metadata.reply_to_message_id for message in pulled)
            if not waiting or (deadline is not None and time.monotonic() >= deadline):
                return replies
            self._stop.event.wait(self._poll_s)


def end_processes(processes: Iterable[tuple[int, int]]) -> None:
    """SIGKILL each process that still is the one noted (same pid and start time, so no reused pid)."""
    for pid, start in dict.fromkeys(processes):
        if pid != os.getpid() and process_start(pid) == start:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
