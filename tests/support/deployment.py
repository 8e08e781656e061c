"""A real local deployment for tests: `fedcifar-deploy up` on free loopback ports in a tmp folder.

One harness for every deployment test: it starts the SuperLink and SuperNodes with
the real command line, runs `flwr` CLI commands against them, lets a test kill,
restart or add processes, and in `teardown` ends every process it started, by
process group, whatever the test did. Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from fedcifar_app.client.warm.folder import WarmFolder
from fedcifar_app.deploy.commands import SUPERNODE_CONNECTED_MARKER
from fedcifar_app.deploy.flwr_cli import CONTROL_FEDERATION
from fedcifar_app.deploy.processes import (
    ANSI_ESCAPE,
    child_environment,
    flower_executable,
    live_session_members,
    log_contains,
    start_process,
    stop_processes,
)
from fedcifar_app.deploy.state import WARM, WARM_PARENT_NAME, ManagedProcess, load_state, state_path
from fedcifar_app.procfs import process_start, read_proc_stat
from support.flwr_run import PROJECT, FlwrRun

CLI_TIMEOUT_S = 60
DEPLOY_TIMEOUT_S = 180


def free_port_block(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` consecutive ports that are free on `host` right now."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 60000 - count)
        try:
            for port in range(base, base + count):
                with socket.socket() as probe:
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    probe.bind((host, port))
        except OSError:
            continue
        return list(range(base, base + count))
    raise RuntimeError(f"no block of {count} free ports found")


def kill_group(pid: int) -> None:
    """SIGKILL the process group `pid` leads; quiet if it is gone."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_bounded(
    command: Sequence[str], *, cwd: Path, timeout_s: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """A CLI with no stdin and a time bound, its text output captured; the caller judges the exit code."""
    return subprocess.run(
        list(command),
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def cli_json(command: list[str], cwd: Path = PROJECT) -> dict:
    """Run a `flwr ... --format json` command (bounded) and return its JSON answer."""
    result = run_bounded(command, cwd=cwd, timeout_s=CLI_TIMEOUT_S)
    start = result.stdout.find("{")
    assert start >= 0, f"no JSON from {' '.join(command)}:\n{result.stdout}\n{result.stderr}"
    answer = json.loads(result.stdout[start:])
    assert answer.get("success"), answer
    return answer


class LocalDeployment:
    """A SuperLink and SuperNodes from `fedcifar-deploy up`, plus the processes a test adds."""

    def __init__(
        self, root: Path, env: dict[str, str], nodes: int = 2, spare_ports: int = 2, data_paths: Sequence[Path] = ()
    ):
        self.root = root
        self.env = env
        self.nodes = nodes
        self.data_paths = list(data_paths)  # one own data folder per SuperNode (--data-path), if given
        self.dir = root / "deploy"
        ports = free_port_block(3 + nodes + spare_ports)
        self.superlink_ports = ports[:3]
        self.clientappio_base_port = ports[3]
        self.spare_ports = ports[3 + nodes :]  # for SuperNodes a test starts by hand
        self.up_flags: tuple[str, ...] = ()
        self.extra: list[ManagedProcess] = []  # started by a test beside `up`'s
        self.restarted: dict[str, subprocess.Popen] = {}  # `up`'s SuperNodes a test started again
        self.runs: list[FlwrRun] = []

    # ---- addresses
    @property
    def tls(self) -> bool:
        return "--tls" in self.up_flags

    @property
    def fleet_address(self) -> str:
        return f"127.0.0.1:{self.superlink_ports[1]}"

    @property
    def ca_certificate(self) -> Path:
        return self.dir / "certs" / "ca.crt"

    def federation_args(self) -> list[str]:
        """The app's federation for this deployment, pointed at its Control port (and CA, with TLS)."""
        overrides = f"address='127.0.0.1:{self.superlink_ports[2]}'"
        if not self.tls:
            return ["local-deployment", "--federation-config", overrides]
        return ["local-deployment-tls", "--federation-config", f"{overrides} root-certificates='{self.ca_certificate}'"]

    # ---- fedcifar-deploy
    def deploy_cli(self, *args: str) -> subprocess.CompletedProcess:
        """`python -m fedcifar_app.deploy ARGS --dir DIR`, bounded; the caller judges the exit code."""
        command = [sys.executable, "-m", "fedcifar_app.deploy", *args, "--dir", str(self.dir)]
        return run_bounded(command, cwd=self.root, timeout_s=DEPLOY_TIMEOUT_S, env=self.env)

    def up(self, *flags: str) -> str:
        """`up` with this harness's ports, data folders and `flags`; returns what it printed."""
        self.up_flags = flags
        data = [arg for path in self.data_paths for arg in ("--data-path", str(path))]
        result = self.deploy_cli(
            "up",
            "--nodes",
            str(self.nodes),
            "--superlink-ports",
            ",".join(map(str, self.superlink_ports)),
            "--clientappio-base-port",
            str(self.clientappio_base_port),
            *data,
            *flags,
        )
        assert result.returncode == 0, f"up failed:\n{result.stdout}\n{result.stderr}"
        return result.stdout

    def down(self) -> None:
        """`down`, then end by process group whatever this test started or restarted."""
        for process in self.restarted.values():
            kill_group(process.pid)
            process.wait(timeout=10)
        self.restarted.clear()
        stop_processes(self.extra, grace_s=5)
        state = load_state(self.dir)
        if state is None:
            return
        result = self.deploy_cli("down", "--stop-grace", "3")
        leftovers = stop_processes(state.processes, grace_s=3)
        assert result.returncode == 0, f"down failed:\n{result.stdout}\n{result.stderr}"
        assert not leftovers, f"still running after down: {leftovers}"
        assert not state_path(self.dir).exists(), "down left the pid state behind"
        assert (self.dir / "logs" / "superlink.log").is_file(), "down removed the logs"

    def teardown(self) -> None:
        for run in self.runs:
            run.kill()
        self.down()

    # ---- processes
    def record(self, name: str) -> ManagedProcess:
        state = load_state(self.dir)
        assert state is not None, "no deployment recorded"
        return next(p for p in state.processes if p.name == name)

    def alive(self, name: str) -> bool:
        if name in self.restarted:
            return self.restarted[name].poll() is None
        return bool(live_session_members(self.record(name)))

    def kill(self, name: str) -> None:
        """SIGKILL the process group of `name` (the process and every Flower child of it)."""
        pid = self.restarted.pop(name).pid if name in self.restarted else self.record(name).pid
        kill_group(pid)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            stat = read_proc_stat(pid)
            if stat is None or stat.state == "Z":
                return
            time.sleep(0.1)
        pytest.fail(f"{name} (pid {pid}) survived SIGKILL")

    def start_extra_supernode(self, name: str, command: list[str]) -> subprocess.Popen:
        """A SuperNode outside `up` (e.g. to show it is refused); ended in teardown."""
        log = self.dir / "logs" / f"{name}.log"
        env = child_environment(self.dir / "flwr-home" / name, {"FEDCIFAR_CACHE_DIR": self.env["FEDCIFAR_CACHE_DIR"]})
        process = start_process(name, command, log, self.root, env)
        self.extra.append(ManagedProcess(name, process.pid, process_start(process.pid), str(log), command))
        return process

    def restart_node(self, name: str) -> None:
        """Start SuperNode `name` again with the flags `up` gave it; wait until it is connected."""
        record = self.record(name)
        log = self.dir / "logs" / f"{name}-restarted.log"
        env = self.node_environment(name)
        process = start_process(name, record.command, log, self.root, env)
        self.restarted[name] = process
        deadline = time.monotonic() + 60
        while not log_contains(log, SUPERNODE_CONNECTED_MARKER):
            assert process.poll() is None, f"{name} exited again:\n{log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"{name} did not reconnect:\n{log.read_text()[-2000:]}"
            time.sleep(0.1)

    def node_environment(self, name: str) -> dict[str, str]:
        """The environment `up` gave SuperNode `name`: its FLWR_HOME, and the warm start unless --cold."""
        env = child_environment(self.dir / "flwr-home" / name)
        state = load_state(self.dir)
        if state is not None and state.clientapp_start == WARM:
            env = WarmFolder(Path(state.warm_folder)).environment(env)
        return env

    @property
    def warm_parent_log(self) -> Path:
        return self.dir / "logs" / f"{WARM_PARENT_NAME}.log"

    def heal(self) -> None:
        """Bring back whatever an earlier test left dead, so tests do not depend on each other."""
        if not load_state(self.dir) or not self.alive("superlink"):
            self.down()
            self.up(*self.up_flags)
            return
        for index in range(self.nodes):
            if not self.alive(f"supernode-{index}"):
                self.restart_node(f"supernode-{index}")

    def node_log(self, name: str) -> Path:
        """The latest log of SuperNode `name` (its restarted one, once restarted)."""
        return self.dir / "logs" / (f"{name}-restarted.log" if name in self.restarted else f"{name}.log")

    def node_id(self, name: str) -> int:
        """The node id SuperNode `name` printed when the SuperLink accepted it (its latest log)."""
        found = re.findall(r"SuperNode ID: (\d+)", ANSI_ESCAPE.sub("", self.node_log(name).read_text()))
        assert found, f"no node id in {self.node_log(name)}"
        return int(found[-1])

    # ---- the flwr CLI
    def start_run(self, config: str, output_dir: Path, app_dir: Path = PROJECT) -> FlwrRun:
        """`flwr run . <this federation> --stream` in `app_dir`, in the background (tests/support/flwr_run.py)."""
        log = self.root / f"flwr-run-{len(self.runs)}.log"
        run = FlwrRun(
            output_dir,
            config,
            env=self.env,
            federation=self.federation_args(),
            extra_args=("--stream",),
            log_path=log,
            app_dir=app_dir,
        )
        self.runs.append(run)
        return run.start()

    def run(self, config: str, output_dir: Path, app_dir: Path = PROJECT) -> FlwrRun:
        return self.start_run(config, output_dir, app_dir).wait()

    def flwr(self, command: str, *args: str, options: Sequence[str] = (), timeout_s: float = CLI_TIMEOUT_S):
        """`flwr COMMAND ARGS . <this federation> OPTIONS`, bounded; the caller judges the exit code."""
        argv = [flower_executable("flwr"), command, *args, ".", *self.federation_args(), *options]
        return run_bounded(argv, cwd=PROJECT, timeout_s=timeout_s, env=self.env)

    def listed_runs(self) -> list[dict]:
        """`flwr ls` as JSON: the runs this SuperLink knows."""
        return cli_json([flower_executable("flwr"), "ls", ".", *self.federation_args(), "--format", "json"])["runs"]

    def supernodes(self) -> list[dict]:
        """`flwr supernode list` as JSON, through the control project `up` wrote."""
        command = [flower_executable("flwr"), "supernode", "list", str(self.dir / "control"), CONTROL_FEDERATION]
        return cli_json([*command, "--format", "json"])["nodes"]
