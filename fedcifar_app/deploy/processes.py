"""Processes: start each in its own session, watch it through /proc, stop it by group.

Every Flower process `up` starts leads its own session, so its pid is also its
process group and session id: `down` ends it together with every child Flower
spawned (SuperExec, ServerApp, ClientApps), and a pid reused by an unrelated
process is told apart by its kernel start time.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import DeployError
from ..procfs import read_proc_stat, session_members
from .state import ManagedProcess

POLL_INTERVAL_S = 0.1
# Flower errors whose line says more than the traceback that follows them.
KNOWN_FLOWER_ERRORS = (
    "No SuperNode found with the given public key",
    "CERTIFICATE_VERIFY_FAILED",
    "Address already in use",
)
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def flower_executable(name: str) -> str:
    """Path of a Flower console script, preferring the running interpreter's env.

    Tests and users often call `.venv/bin/python -m fedcifar_app.deploy` without
    activating the venv; the Flower tools must still come from that venv.
    """
    beside_python = Path(sys.executable).parent / name
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    found = shutil.which(name)
    if found is None:
        raise DeployError(f"`{name}` not found; install the app (pip install -e ., it brings flwr) in this environment")
    return found


def child_environment(flower_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower processes.

    PATH leads with this interpreter's bin folder because SuperLink and SuperNode
    launch `flower-superexec` by name. FLWR_HOME gives each process its own app
    and file store, so two nodes never install the same app into one folder at once.
    """
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["FLWR_HOME"] = str(flower_home)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def live_session_members(record: ManagedProcess) -> list[int]:
    """Pids still alive in the session that `record`'s process leads.

    Each process was started in its own session, so its session id is its pid and
    every Flower child it spawned (superexec, ServerApp, ClientApps) shares it.
    A pid now held by an unrelated process (different start time) counts as gone.
    """
    leader = read_proc_stat(record.pid)
    if leader is not None and record.start_ticks is not None:
        if leader.alive and leader.start_ticks != record.start_ticks:
            return []
    if not Path("/proc").is_dir():  # not Linux: ask the kernel about the group
        try:
            os.killpg(record.pid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [record.pid]
    return session_members(record.pid)


def start_process(
    name: str, command: list[str], log_path: Path, cwd: Path, env: Mapping[str, str]
) -> subprocess.Popen[bytes]:
    """Start `command` in its own session, output to `log_path`.

    Its own session (and so its own process group) lets `down` end the process
    together with the children Flower spawns, and keeps Ctrl-C in the terminal
    that ran `up` from reaching the deployment.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if log_path.exists():  # keep the previous log one generation, for post-mortems
        log_path.replace(log_path.with_suffix(".prev.log"))
    with log_path.open("wb") as log_file:
        log_file.write(f"# {name}: {' '.join(command)}\n".encode())
        log_file.flush()
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )


def signal_session(record: ManagedProcess, signum: int) -> None:
    """Send `signum` to the process group of `record` (pgid == pid, see start_process)."""
    try:
        os.killpg(record.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def stop_processes(records: Sequence[ManagedProcess], grace_s: float) -> list[str]:
    """End `records` and their children: SIGTERM, then SIGKILL after `grace_s`.

    Returns the names of processes that were still alive and had to be killed.
    """
    running = [record for record in records if live_session_members(record)]
    for record in running:
        signal_session(record, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while running and time.monotonic() < deadline:
        _reap(running)
        running = [record for record in running if live_session_members(record)]
        if running:
            time.sleep(POLL_INTERVAL_S)
    for record in running:
        signal_session(record, signal.SIGKILL)
    kill_deadline = time.monotonic() + 5.0
    while time.monotonic() < kill_deadline and any(live_session_members(record) for record in running):
        _reap(running)
        time.sleep(POLL_INTERVAL_S)
    return [record.name for record in running]


def _reap(records: Sequence[ManagedProcess]) -> None:
    """Collect those of `records` that are exited children of this process.

    Only our own pids: waiting on any child would steal exit codes from other
    `subprocess.Popen` objects of a caller (such as a test).
    """
    for record in records:
        try:
            os.waitpid(record.pid, os.WNOHANG)
        except ChildProcessError:
            pass


def log_hint(log_path: Path) -> str:
    """The likeliest error message at the end of a log, on one short line.

    Flower ends a failed process with "Exit Code: N", its message, and a link;
    the code and message are what the user needs, not the link. Without one, a
    known Flower error in the last lines wins over a traceback's last line.
    """
    try:
        text = log_path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    lines = [ANSI_ESCAPE.sub("", line).strip() for line in text.splitlines()[-80:]]
    lines = [line for line in lines if line and not line.startswith("For more information")]
    if not lines:
        return ""
    known = [line for line in lines if any(marker in line for marker in KNOWN_FLOWER_ERRORS)]
    hint = known[-1] if known else lines[-1]
    for index in range(len(lines) - 1, -1, -1):
        if "Exit Code:" in lines[index]:
            code = lines[index].split("Exit Code:", 1)[1].strip()
            message = lines[index + 1] if index + 1 < len(lines) else ""
            hint = f"Flower exit code {code}: {message}".strip()
            break
    return hint if len(hint) <= 200 else hint[:197] + "..."


@dataclass
class ReadinessCheck:
    """A started process and the condition that means it is up."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    is_ready: Callable[[], bool]
    what: str  # the condition in words, for the error message


def wait_until_ready(checks: Sequence[ReadinessCheck], timeout_s: float) -> None:
    """Poll every check until all hold; fail at once if a process dies, or at timeout.

    All processes share one deadline, so N SuperNodes come up in parallel.
    """
    deadline = time.monotonic() + timeout_s
    pending = list(checks)
    while pending:
        for check in list(pending):
            exit_code = check.process.poll()
            if exit_code is not None:
                hint = log_hint(check.log_path)
                raise DeployError(
                    f"{check.name} exited with code {exit_code} before {check.what}; "
                    f"read {check.log_path}" + (f" (log says: {hint})" if hint else "")
                )
            if check.is_ready():
                pending.remove(check)
        if pending and time.monotonic() > deadline:
            check = pending[0]
            raise DeployError(
                f"{check.name} did not come up ({check.what}) within {timeout_s:g} s; read {check.log_path}"
            )
        if pending:
            time.sleep(POLL_INTERVAL_S)


def port_accepts(host: str, port: int) -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def check_ports_free(host: str, ports: Sequence[int]) -> None:
    """Fail before starting anything if a port is taken.

    gRPC servers bind with SO_REUSEPORT, so a second SuperLink on a busy port
    would start "fine" and share the traffic; a bind without SO_REUSEPORT here
    notices. SO_REUSEADDR keeps closed connections (TIME_WAIT) from counting.
    """
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as err:
                raise DeployError(
                    f"port {host}:{port} is already in use ({err.strerror}); stop what holds it or choose other ports"
                ) from err


def log_contains(log_path: Path, marker: str) -> bool:
    """True once `marker` appears in the log."""
    try:
        return marker in log_path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False


def split_address(address: str) -> tuple[str, int]:
    """ "host:port" -> (host, port); "[::1]:9092" -> ("::1", 9092)."""
    host, separator, port = address.rpartition(":")
    if not separator or not port.isdigit():
        raise DeployError(f"address {address!r} is not HOST:PORT (e.g. 127.0.0.1:9092)")
    return host.strip("[]"), int(port)
