"""A real `flwr run .` for tests: its own session, its own output-dir, its log in a file.

flwr 1.25 exits 0 even when the ServerApp fails, so tests judge a run by its folder
(status.json, metrics.json). A `flwr run` killed alone leaves flower-simulation and Ray
running, so every run starts a new session and ends with every process of that session gone.
The same class runs against a simulation federation and against a deployment
(tests/support/deployment.py passes the federation and `--stream`).

PROJECT (the app folder) and BIN (this venv's console scripts) are defined here, once.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from fedcifar_app import pyproject
from fedcifar_app.deploy.processes import ANSI_ESCAPE
from fedcifar_app.procfs import session_members

PROJECT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RUN_TIMEOUT_S = 300.0
# An output-dir the run config names itself (a deployment test's config, a printed resume command).
OUTPUT_DIR = re.compile(r"(?:^|\s)output-dir\s*=\s*['\"]([^'\"]*)['\"]")
# What a condition of `wait_for` may raise while the run folder or a file in it is not there yet.
NOT_YET = (AssertionError, FileNotFoundError, ValueError, RuntimeError, EOFError)
# Runs `argv[1:]` with SIGINT at its default action. A suite started as a background job of a script
# inherits SIGINT ignored (POSIX shells do that), an ignored signal stays ignored across exec, and then
# `flwr run` never sees a test's Ctrl-C; Popen has no option for it (restore_signals covers SIGPIPE only).
WITH_DEFAULT_SIGINT = (
    sys.executable,
    "-c",
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execvp(sys.argv[1], sys.argv[1:])",
)


def small_federation(num_supernodes: int = 3) -> str:
    """`--federation-config` for the default federation with fewer SuperNodes, every other option kept."""
    return pyproject.federation_override(PROJECT, {"num-supernodes": num_supernodes})


# Small federations keep end-to-end runs to seconds: 3 SuperNodes, and run-config minimums to match.
SMALL_NODES = "min-train-nodes=3 min-evaluate-nodes=2 min-available-nodes=3"
SMALL_FEDERATION = small_federation(3)  # one string, since flwr refuses a key given twice


def flwr_environment(cache_dir: Path) -> dict[str, str]:
    """The test's environment, with the venv's Flower commands on PATH and a private decode cache."""
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # flwr starts `flower-simulation`
        "FEDCIFAR_CACHE_DIR": str(cache_dir),
    }


class FlwrRun:
    """One `flwr run .` writing into ``output_dir``; the run folder it creates is the only new one there.

    ``federation`` (the positional federation name and its `--federation-config`, as a deployment
    gives them) goes before the options; ``federation_config`` alone overrides the default
    federation. ``output-dir`` is added to ``run_config`` unless the run config names it already.
    The run always starts with SIGINT at its default action (``WITH_DEFAULT_SIGINT``), however the
    test suite itself was started. ``app_dir`` is the app folder `flwr run .` builds the FAB from (a
    changed copy in some tests).
    """

    def __init__(
        self,
        output_dir: Path,
        run_config: str,
        *,
        env: dict[str, str],
        federation: Sequence[str] = (),
        federation_config: str | None = None,
        extra_args: tuple[str, ...] = (),
        log_path: Path | None = None,
        prefix: Sequence[str] = (),
        output_dir_in_run: str | None = None,
        app_dir: Path = PROJECT,
    ) -> None:
        """``prefix`` runs `flwr` through another command, which must exec or wait for it: on another
        "host" (tests/support/ray_cluster.py), or in a private mount namespace (`unshare -m sh -c ...`).
        That host may see ``output_dir`` as ``output_dir_in_run`` (its own /tmp), the path the run config
        names."""
        self.output_dir = Path(output_dir)
        self.app_dir = app_dir
        if log_path is None:  # beside output_dir, unless that is not a folder (a test of a bad output-dir)
            beside = self.output_dir.parent
            folder = beside if beside.is_dir() or not beside.exists() else Path(tempfile.mkdtemp(prefix="flwr-run-"))
            log_path = folder / f"{self.output_dir.name}.log"
        self.log_path = log_path
        named = OUTPUT_DIR.search(run_config)  # a regex, not the parser: tests pass malformed configs too
        seen = Path(output_dir_in_run) if output_dir_in_run else self.output_dir
        if named is None:
            run_config = f"{run_config} output-dir='{seen}'".strip()
        else:
            assert Path(named[1]).resolve() == seen.resolve(), (named[1], seen)
        self.command = [*prefix, str(BIN / "flwr"), "run", ".", *federation, *extra_args, "--run-config", run_config]
        if federation_config:
            self.command += ["--federation-config", federation_config]
        self.env = env
        self.before = set(self.output_dir.iterdir()) if self.output_dir.exists() else set()
        self.process: subprocess.Popen | None = None

    def start(self) -> FlwrRun:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:  # a file, not a pipe: a stray child can never block on it
            self.process = subprocess.Popen(
                [*WITH_DEFAULT_SIGINT, *self.command],
                cwd=self.app_dir,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    @property
    def output(self) -> str:
        """What `flwr run` printed so far, colour codes removed."""
        text = self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""
        return ANSI_ESCAPE.sub("", text)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.output.splitlines()[-lines:])

    @property
    def folder(self) -> Path | None:
        new = sorted(set(self.output_dir.iterdir()) - self.before) if self.output_dir.exists() else []
        new = [path for path in new if path.is_dir()]
        assert len(new) <= 1, f"one run made several folders: {new}"
        return new[0] if new else None

    run_folder = folder  # the name the one-shot tests use

    def _made_folder(self) -> Path:
        folder = self.folder
        assert folder is not None, f"no run folder in {self.output_dir}; log tail:\n{self.log_tail()}"
        return folder

    @property
    def status(self) -> dict:
        return json.loads((self._made_folder() / "status.json").read_text())

    @property
    def metrics(self) -> list[dict]:
        """The rows of metrics.json; [] while (or when) the run has written none."""
        path = self._made_folder() / "metrics.json"
        return json.loads(path.read_text()) if path.exists() else []

    def checkpoint_round(self) -> int:
        """The round in the run folder's checkpoint.pt (written atomically), or -1 before the first one."""
        import torch  # here: most users of this module never read a checkpoint

        folder = self.folder
        if folder is None or not (folder / "checkpoint.pt").exists():
            return -1
        return int(torch.load(folder / "checkpoint.pt", map_location="cpu", weights_only=True)["round"])

    @property
    def run_id(self) -> str:
        """The run id Flower printed when it started the run (a deployment's `flwr run`)."""
        found = re.search(r"started run (\d+)", self.output)
        assert found, f"no run id in the flwr run output; log tail:\n{self.log_tail()}"
        return found[1]

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.returncode

    def wait(self, timeout_s: float = RUN_TIMEOUT_S) -> FlwrRun:
        """Wait for `flwr run` to end (bounded), then end whatever of its session is left."""
        assert self.process is not None
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"flwr run still running after {timeout_s:.0f}s; log tail:\n{self.log_tail()}")
        self.kill()
        return self

    def wait_for(self, what: str, condition: Callable[[], object], timeout_s: float = RUN_TIMEOUT_S) -> None:
        """Poll ``condition()`` until true; fail with the log tail if the run ends or time runs out first.

        A condition that raises one of NOT_YET (no run folder yet, a file not written yet) is not met yet.
        """
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ended = self.process.poll() is not None  # before the check: a run may meet it as it ends
            try:
                if condition():
                    return
            except NOT_YET:
                pass
            if ended:
                self.kill()
                pytest.fail(f"flwr run ended before {what}; log tail:\n{self.log_tail()}")
            time.sleep(0.2)
        self.kill()
        pytest.fail(f"no {what} after {timeout_s:.0f}s; log tail:\n{self.log_tail()}")

    def signal(self, signum: int, *, group: bool = True) -> None:
        """Send ``signum`` to the run's process group, as a terminal's Ctrl-C does (or to `flwr` alone)."""
        assert self.process is not None
        (os.killpg if group else os.kill)(self.process.pid, signum)

    def kill(self) -> None:
        """SIGKILL the process group, then anything of its session that left the group; assert none is left."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)
        deadline = time.monotonic() + 30
        while (members := session_members(self.process.pid)) and time.monotonic() < deadline:
            for pid in members:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        assert not session_members(self.process.pid), (
            f"processes of the run survive: {session_members(self.process.pid)}"
        )


def run_flwr(
    output_dir: Path,
    run_config: str,
    *,
    env: dict[str, str],
    federation_config: str | None = SMALL_FEDERATION,
    timeout: float = 240,
    extra_args: tuple[str, ...] = (),
) -> FlwrRun:
    """Run `flwr run .` to the end (on the small federation unless told) and return it (its folder,
    status, metrics and output)."""
    return (
        FlwrRun(output_dir, run_config, env=env, federation_config=federation_config, extra_args=extra_args)
        .start()
        .wait(timeout)
    )
