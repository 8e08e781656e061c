"""``flwr-clientapp`` as SuperExec finds it first on PATH: hand this start to the warm parent.

SuperExec runs ``flwr-clientapp --insecure --clientappio-api-address ... --token ...`` (1.42:
``--runtime-api-address``) by name, without waiting for it. This stand-in sends its argv,
environment, working directory, process settings and stdio to the warm parent (FEDCIFAR_WARM_SOCKET),
which forks a child that runs Flower's own ``flwr-clientapp`` code with them; it forwards the
signals it gets to that child and exits with the child's exit code, so to SuperExec, `down` and
Ctrl-C it behaves as Flower's process would.

When the warm path cannot be used (no parent, a refusal, a timeout) it prints ONE warning line and
execs the next ``flwr-clientapp`` on PATH, Flower's real one: the message runs cold, as without the
warm start. Stdlib only: this runs once per message and must start in milliseconds.
"""

from __future__ import annotations

import os
import resource
import select
import signal
import sys
from typing import NoReturn

from . import protocol

EXECUTABLE = "flwr-clientapp"
# Until the child says "ready". Forks are queued in one parent; a start that waits longer is better off cold.
READY_TIMEOUT_S = 20.0
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
UNKNOWN_EXIT_CODE = 1


def real_clientapp(path_variable: str, shim: str) -> str | None:
    """The first ``flwr-clientapp`` on PATH that is not this shim: Flower's own."""
    shim_real = os.path.realpath(shim)
    for folder in path_variable.split(os.pathsep):
        candidate = os.path.join(folder or ".", EXECUTABLE)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            if os.path.realpath(candidate) != shim_real:
                return candidate
    return None


def warn(text: str) -> None:
    """One line in the SuperNode's log, in the shape of Flower's own WARNING lines."""
    print(f"WARNING :   {text}", file=sys.stderr, flush=True)


def start_cold(real: str, reason: str) -> NoReturn:
    """Become Flower's real flwr-clientapp, after one warning line that says why."""
    warn(f"warm ClientApp start unavailable ({reason}); this ClientApp starts cold")
    os.execv(real, [real, *sys.argv[1:]])


def process_settings(real: str) -> dict[str, object]:
    """What a cold flwr-clientapp would inherit from SuperExec besides stdio, as the child must take it on."""
    umask = os.umask(0)
    os.umask(umask)
    limits = {}
    for name in dir(resource):
        if name.startswith("RLIMIT_"):
            try:
                limits[name] = list(resource.getrlimit(getattr(resource, name)))
            except (OSError, ValueError):
                pass
    ignored = [int(number) for number in signal.valid_signals() if _ignored(number)]
    return {
        "argv": [real, *sys.argv[1:]],
        "environ": [os.fsdecode(key) + "=" + os.fsdecode(value) for key, value in os.environb.items()],
        "cwd": os.fsdecode(os.getcwd()),
        "umask": umask,
        "affinity": sorted(os.sched_getaffinity(0)),
        "nice": os.getpriority(os.PRIO_PROCESS, 0),
        "rlimits": limits,
        "ignored_signals": ignored,
        "clientapp": real,
    }


def _ignored(number: int) -> bool:
    try:
        return signal.getsignal(number) is signal.SIG_IGN
    except (OSError, ValueError):
        return False


def exit_like(code: int) -> NoReturn:
    """Exit as the child did: its code, or killed by the same signal."""
    sys.stdout.flush()
    sys.stderr.flush()
    if code < 0:
        if -code not in (signal.SIGKILL, signal.SIGSTOP):  # those two have no handler to reset
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code if code >= 0 else 128 - code)


def main() -> int:
    """Run this message's ClientApp warm, or cold with one warning line."""
    real = real_clientapp(os.environ.get("PATH", os.defpath), sys.argv[0])
    if real is None:
        print(f"fedcifar-warm-shim: no {EXECUTABLE} on PATH after this shim; install flwr", file=sys.stderr)
        return 1
    socket_path = os.environ.get(protocol.SOCKET_ENV, "")
    if not socket_path:
        start_cold(real, f"{protocol.SOCKET_ENV} is not set")
    try:
        settings = process_settings(real)
        sock = protocol.connect(socket_path, READY_TIMEOUT_S)
    except OSError as err:
        start_cold(real, f"no warm parent at {socket_path}: {err.strerror or err}")
    try:
        protocol.send(sock, protocol.REQUEST, fds=range(protocol.STDIO_FDS), **settings)
    except OSError as err:  # a huge environment, or a parent gone since it accepted
        sock.close()
        start_cold(real, f"the request could not be sent to the warm parent: {err.strerror or err}")
    try:
        reply, _ = protocol.receive(sock)
    except OSError as err:
        sock.close()
        start_cold(real, f"the warm parent did not answer: {err.strerror or err}")
    if reply is None or reply["kind"] != protocol.READY:
        sock.close()
        if reply is None:
            reason = "the warm parent closed the connection"
        elif reply["kind"] == protocol.EXIT:
            reason = f"the warm child ended before it started (exit code {reply.get('code')})"
        else:
            reason = f"the warm parent refused: {reply.get('reason', 'no reason given')}"
        start_cold(real, reason)
    return run_warm(sock, int(reply["pid"]))


def run_warm(sock, pid: int) -> NoReturn:
    """Let the child run, forward signals to it, and exit as it exits."""
    child = os.pidfd_open(pid)

    def forward(number: int, _frame: object) -> None:
        try:
            signal.pidfd_send_signal(child, number)
        except OSError:
            pass  # it has ended already

    for number in FORWARDED_SIGNALS:
        if signal.getsignal(number) is not signal.SIG_IGN:
            signal.signal(number, forward)
    sock.settimeout(None)
    try:
        protocol.send(sock, protocol.GO)
        reply, _ = protocol.receive(sock)
    except OSError:
        reply = None
    if reply is not None and reply["kind"] == protocol.EXIT:
        exit_like(int(reply["code"]))
    # The parent ended while the child ran: wait for the child itself; its code died with the parent.
    select.select([child], [], [])
    warn(f"the warm parent ended while ClientApp pid {pid} ran; its exit code is unknown")
    exit_like(UNKNOWN_EXIT_CODE)
