"""The warm parent: import torch, numpy and Flower's ClientApp runtime once, then fork per message.

It holds imports only: no torch op, no gRPC channel, no Python thread, so every fork starts from a
state that is safe to copy. Before each fork it checks that this is still so (``unsafe_state``) and
that the requesting shim is one it may serve (``refusal``); when not, it refuses and the shim starts
Flower's ``flwr-clientapp`` cold. It never imports the app itself: the child loads the app from the
FAB that Flower installs for the run (child.py).

The one native thread that ``import torch`` leaves is OpenBLAS's worker (numpy's bundled
``libscipy_openblas``, cores - 1 workers started when the library loads). OpenBLAS registers a
``pthread_atfork`` handler that stops its pool before any fork and restarts it lazily, so a child
never inherits a half-copied pool; one throwaway fork after preloading stops it for good here, and
from then on the parent must be exactly one thread at every fork.

One process, one thread, one ``selectors`` loop: the listening socket, the connections that have
not sent their request yet, a pidfd per running child (its exit code goes back to its shim), the
pidfds of the SuperNodes it serves (it ends when they all have), and a wake-up socket for signals.
"""

from __future__ import annotations

import gc
import importlib
import importlib.metadata
import logging
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from ...logs import APP_LOGGER
from . import protocol
from .child import ChildStart
from .folder import WarmFolder

logger = logging.getLogger(APP_LOGGER)

# What a ClientApp of this app imports besides its own modules (measured: benchmarks/README.md).
# torch.optim's first step imports torch._dynamo, ~0.8 CPU-s, so it is preloaded too.
DEFAULT_PRELOAD = ("numpy", "torch", "torch.nn", "torch.optim", "torch._dynamo")
CLIENTAPP_SCRIPT = "flwr-clientapp"
# Environment read when the interpreter or a preloaded library starts: a forked child cannot take on
# another value, so a SuperNode whose value differs from the parent's gets cold starts. The thread
# counts are the exception: the child sets them (child.thread_settings).
LOAD_TIME_PREFIXES = (
    "PYTHON",
    "LD_",
    "GLIBC_TUNABLES",
    "MALLOC_",
    "LANG",
    "LC_",
    "OMP_",
    "GOMP_",
    "KMP_",
    "MKL_",
    "OPENBLAS_",
    "GOTO_",
    "TORCH",
    "FLWR_",
)
SET_IN_CHILD = frozenset({"OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS"})
PER_NODE = frozenset({"FLWR_HOME"})  # read when used, never at import
# Namespaces a child must share with its shim: the network one above all (ClientAppIo is on the
# SuperNode's loopback), the others so that paths, pids and users mean the same.
NAMESPACES = ("net", "mnt", "pid", "ipc", "uts", "user", "cgroup")
PENDING_REQUEST_TIMEOUT_S = 30.0
DRAIN_S = 5.0  # after the last SuperNode ends, running children may still report their exit
SO_PEERCRED_FORMAT = "3i"  # struct ucred: pid, uid, gid


@dataclass(frozen=True)
class FileIdentity:
    """A file as it was when preloaded: a `pip install` replaces it with another inode."""

    path: str
    device: int
    inode: int
    mtime_ns: int

    @classmethod
    def of(cls, path: str) -> FileIdentity | None:
        try:
            stat = os.stat(path)
        except OSError:
            return None
        return cls(path, stat.st_dev, stat.st_ino, stat.st_mtime_ns)


@dataclass
class Preloaded:
    """What the parent imported and what every check compares against."""

    modules: tuple[str, ...]
    clientapp: Callable[[], Any]  # Flower's `flwr-clientapp` entry function
    clientapp_script: str  # the flwr-clientapp executable beside this interpreter
    files: tuple[FileIdentity, ...]
    start_environ: dict[str, str]  # before any import: what the libraries saw when they loaded
    import_environ: dict[str, str]  # what the imports themselves set (flwr sets GRPC_VERBOSITY ...)
    affinity: frozenset[int]
    seconds: float
    cpu_seconds: float


def preload(modules: Sequence[str]) -> Preloaded:
    """Import `modules` and Flower's `flwr-clientapp` entry point; nothing is run."""
    start_environ = dict(os.environ)
    started, cpu_started = time.monotonic(), time.process_time()
    for name in modules:
        importlib.import_module(name)
    (entry,) = importlib.metadata.entry_points(group="console_scripts", name=CLIENTAPP_SCRIPT)
    clientapp = entry.load()
    script = str(Path(sys.executable).parent / CLIENTAPP_SCRIPT)
    roots = {name.split(".")[0] for name in (*modules, entry.module)}
    files = [FileIdentity.of(script)]
    files += [FileIdentity.of(getattr(sys.modules[root], "__file__", None) or "") for root in sorted(roots)]
    import_environ = {key: value for key, value in os.environ.items() if start_environ.get(key) != value}
    return Preloaded(
        modules=tuple(modules),
        clientapp=clientapp,
        clientapp_script=script,
        files=tuple(identity for identity in files if identity is not None),
        start_environ=start_environ,
        import_environ=import_environ,
        affinity=frozenset(os.sched_getaffinity(0)),
        seconds=time.monotonic() - started,
        cpu_seconds=time.process_time() - cpu_started,
    )


def settle() -> None:
    """One throwaway fork: OpenBLAS's atfork handler stops the worker pool that numpy started at load."""
    with warnings.catch_warnings():  # Python 3.12+ warns of a fork beside that thread: this one is the cure
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)


def unsafe_state(preloaded: Preloaded) -> str | None:
    """Why forking now would copy something a child cannot use, or None when it is safe."""
    threads = [thread.name for thread in threading.enumerate() if thread is not threading.main_thread()]
    if threads or len(sys._current_frames()) > 1:
        return f"the warm parent runs Python threads besides its main one ({', '.join(threads) or 'unnamed'})"
    try:
        tasks = len(os.listdir("/proc/self/task"))
    except OSError:
        tasks = 1
    if tasks > 1:
        return f"the warm parent runs {tasks - 1} native thread(s) besides its main one (an OpenMP or gRPC pool?)"
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return "CUDA is initialised in the warm parent"
    for identity in preloaded.files:
        if FileIdentity.of(identity.path) != identity:
            return f"{identity.path} changed on disk since the warm parent started; restart it"
    return None


def peer_credentials(conn: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end, from the kernel (SO_PEERCRED)."""
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize(SO_PEERCRED_FORMAT))
    pid, uid, gid = struct.unpack(SO_PEERCRED_FORMAT, raw)
    return pid, uid, gid


def load_time_differences(start_environ: Mapping[str, str], environ: Mapping[str, str]) -> list[str]:
    """Variables read at interpreter start or library load whose value differs between the two."""
    names = {name for name in (*start_environ, *environ) if name.startswith(LOAD_TIME_PREFIXES)}
    names -= SET_IN_CHILD | PER_NODE
    return sorted(name for name in names if start_environ.get(name) != environ.get(name))


def shared_namespaces(pid: int) -> str | None:
    """The first namespace or cgroup that `pid` does not share with this process, or None. A peer this
    process cannot see (pid 0 from SO_PEERCRED: it lives in another pid namespace; or gone) shares none."""
    if pid <= 0 or not os.path.isdir(f"/proc/{pid}"):
        return "pid namespace"
    for name in NAMESPACES:
        if not os.path.exists(f"/proc/self/ns/{name}"):
            continue  # a kernel without this namespace kind
        if os.readlink(f"/proc/{pid}/ns/{name}") != os.readlink(f"/proc/self/ns/{name}"):
            return f"{name} namespace"
    try:
        with open(f"/proc/{pid}/cgroup", "rb") as theirs, open("/proc/self/cgroup", "rb") as ours:
            if theirs.read() != ours.read():
                return "cgroup"
    except FileNotFoundError:
        pass
    return None


def refusal(preloaded: Preloaded, peer: tuple[int, int, int], request: Mapping[str, Any]) -> str | None:
    """Why this request must run cold, or None when a warm child can run it exactly like a cold one."""
    pid, uid, _gid = peer
    if uid != os.geteuid():
        return f"the request comes from uid {uid}, the warm parent runs as uid {os.geteuid()}"
    try:
        other = shared_namespaces(pid)
        if other is not None:
            return f"the SuperNode runs in another {other} than the warm parent; start one warm parent inside it"
        same_clientapp = os.path.samefile(str(request["clientapp"]), preloaded.clientapp_script)
    except OSError as err:
        return f"cannot compare with the requesting process ({err.strerror})"
    if not same_clientapp:
        return (
            f"this SuperNode runs {request['clientapp']}, the warm parent has Flower from {preloaded.clientapp_script}"
        )
    environ = dict(entry.partition("=")[::2] for entry in request["environ"])
    differences = load_time_differences(preloaded.start_environ, environ)
    if differences:
        return f"{', '.join(differences[:3])} differ from the warm parent's; start it with the SuperNode's environment"
    return unsafe_state(preloaded)


@dataclass
class Running:
    """A forked child whose exit code goes back to its shim."""

    pid: int
    pidfd: int
    conn: socket.socket


@dataclass
class WarmParent:
    """The serve loop (see the module docstring); `serve` returns a ChildStart only in a forked child."""

    folder: WarmFolder
    preloaded: Preloaded
    exit_with: Sequence[int] = ()
    command: Sequence[str] = ()  # wrapper mode: run this (a flower-supernode) and end with it
    pid: int = field(default_factory=os.getpid)
    served: int = 0
    refused: int = 0
    child_cpu_s: float = 0.0
    child_max_rss_kb: int = 0
    _reasons: set[str] = field(default_factory=set)

    def serve(self) -> ChildStart | int:
        selector = selectors.DefaultSelector()
        wake_read, wake_write = socket.socketpair()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pending: dict[socket.socket, float] = {}
        running: dict[int, Running] = {}
        watched: dict[int, int] = {}  # pidfd -> pid of a SuperNode (or the wrapped command)
        received: list[int] = []
        command: subprocess.Popen[bytes] | None = None
        owned: list[selectors.BaseSelector | socket.socket] = [selector, wake_read, wake_write, listener]
        socket_inode: int | None = None

        def on_signal(number: int, _frame: object) -> None:
            received.append(number)

        try:
            for sock in (wake_read, wake_write):
                sock.setblocking(False)
            signal.set_wakeup_fd(wake_write.fileno(), warn_on_full_buffer=False)
            for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(number, on_signal)
            socket_inode = self.folder.bind(listener)
            listener.listen(64)
            selector.register(listener, selectors.EVENT_READ, "accept")
            selector.register(wake_read, selectors.EVENT_READ, "signal")
            if self.command:
                # The environment from before the preload: its imports set variables (TORCHINDUCTOR_CACHE_DIR,
                # GRPC_VERBOSITY) that the SuperNode must not inherit, or its ClientApps would differ from ours.
                env = self.folder.environment(self.preloaded.start_environ)
                command = subprocess.Popen(list(self.command), env=env)
                watched[os.pidfd_open(command.pid)] = command.pid
            for pid in self.exit_with:
                try:
                    watched[os.pidfd_open(pid)] = pid
                except ProcessLookupError:
                    logger.warning("warm start: SuperNode pid %d has already ended", pid)
            for pidfd in watched:
                selector.register(pidfd, selectors.EVENT_READ, "watched")
            self._log_ready(watched)
            stop_at: float | None = None
            if (self.exit_with or self.command) and not watched:
                stop_at = time.monotonic()
            while stop_at is None or (running and time.monotonic() < stop_at):
                timeout = 1.0 if stop_at is None else max(0.0, stop_at - time.monotonic())
                for key, _events in selector.select(timeout):
                    what = key.data
                    if what == "accept":
                        conn, _ = listener.accept()
                        pending[conn] = time.monotonic()
                        selector.register(conn, selectors.EVENT_READ, "request")
                    elif what == "request":
                        conn = cast(socket.socket, key.fileobj)
                        selector.unregister(conn)
                        del pending[conn]
                        outcome = self._start(conn, owned + list(pending) + [r.conn for r in running.values()])
                        if isinstance(outcome, ChildStart):
                            outcome.drop_parent([*watched, *(r.pidfd for r in running.values())])
                            return outcome
                        if outcome is not None:
                            running[outcome.pidfd] = outcome
                            selector.register(outcome.pidfd, selectors.EVENT_READ, "child")
                    elif what == "child":
                        self._finish(running.pop(key.fd))
                        selector.unregister(key.fd)
                        os.close(key.fd)
                    elif what == "watched":
                        selector.unregister(key.fd)
                        os.close(key.fd)
                        watched.pop(key.fd)
                    elif what == "signal":
                        wake_read.recv(512)
                for conn in [
                    conn for conn, since in pending.items() if time.monotonic() - since > PENDING_REQUEST_TIMEOUT_S
                ]:
                    selector.unregister(conn)
                    del pending[conn]
                    conn.close()
                handled = received[:]  # a signal that comes while these are handled waits for the next turn
                del received[: len(handled)]
                stop = self._handle_signals(handled, command)
                if stop_at is None and (stop or ((self.exit_with or self.command) and not watched)):
                    stop_at = time.monotonic() + DRAIN_S
                    self.folder.unbind(socket_inode)
                    selector.unregister(listener)
                    listener.close()
            return self._exit_code(command)
        finally:
            if os.getpid() == self.pid:  # never in a forked child
                signal.set_wakeup_fd(-1)
                self.folder.unbind(socket_inode)
                for conn in [*pending, *(r.conn for r in running.values())]:
                    conn.close()
                for pidfd in [*watched, *running]:
                    os.close(pidfd)
                for resource_ in owned:
                    resource_.close()
                logger.info(
                    "warm start: parent pid %d ends; %d ClientApps started warm (%.2f CPU-s each on average, "
                    "peak RSS %d MB), %d refused",
                    self.pid,
                    self.served,
                    self.child_cpu_s / max(1, self.served),
                    self.child_max_rss_kb // 1024,
                    self.refused,
                )

    def _log_ready(self, watched: Mapping[int, int]) -> None:
        serving = f"SuperNode pid(s) {', '.join(map(str, watched.values()))}" if watched else "until stopped"
        logger.info(
            "warm start: parent pid %d ready on %s (preloaded %s in %.1f s, %.1f CPU-s); serving %s",
            self.pid,
            self.folder.socket_path,
            ", ".join(self.preloaded.modules),
            self.preloaded.seconds,
            self.preloaded.cpu_seconds,
            serving,
        )

    def _start(self, conn: socket.socket, parent_resources: list[Any]) -> ChildStart | Running | None:
        """Read one request and fork for it, or refuse it; ChildStart in the child."""
        try:
            request, fds = protocol.receive(conn, protocol.STDIO_FDS)
        except OSError as err:
            logger.warning("warm start: unreadable request (%s)", err)
            conn.close()
            return None
        if request is None or request["kind"] != protocol.REQUEST or len(fds) != protocol.STDIO_FDS:
            for fd in fds:
                os.close(fd)
            conn.close()
            return None
        try:
            peer = peer_credentials(conn)
            reason = refusal(self.preloaded, peer, request)
        except (OSError, KeyError, TypeError, ValueError) as err:
            reason = f"the request cannot be read ({err})"
        if reason is not None:
            self._refuse(conn, fds, reason)
            return None
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError as err:  # out of processes or memory: this message runs cold, the parent goes on
            self._refuse(conn, fds, f"fork failed ({err.strerror})")
            return None
        if pid == 0:
            return ChildStart(request, fds, conn, peer[0], self.preloaded, parent_resources)
        for fd in fds:
            os.close(fd)
        self.served += 1
        return Running(pid, os.pidfd_open(pid), conn)

    def _refuse(self, conn: socket.socket, fds: list[int], reason: str) -> None:
        self.refused += 1
        if reason not in self._reasons:  # the SuperNode's log has a line per message; this log one per reason
            self._reasons.add(reason)
            logger.warning("warm start: refused a ClientApp start (%s)", reason)
        try:
            protocol.send(conn, protocol.REFUSE, reason=reason)
        except OSError:
            pass
        for fd in fds:
            os.close(fd)
        conn.close()

    def _finish(self, child: Running) -> None:
        _, status, usage = os.wait4(child.pid, 0)
        self.child_cpu_s += usage.ru_utime + usage.ru_stime
        self.child_max_rss_kb = max(self.child_max_rss_kb, usage.ru_maxrss)
        # One line per ClientApp: what each message cost (benchmarks/deployment.py reads these).
        logger.info(
            "warm start: ClientApp pid %d ended (exit code %d) after %.3f CPU-s, peak RSS %d MB",
            child.pid,
            os.waitstatus_to_exitcode(status),
            usage.ru_utime + usage.ru_stime,
            usage.ru_maxrss // 1024,
        )
        try:
            protocol.send(child.conn, protocol.EXIT, code=os.waitstatus_to_exitcode(status))
        except OSError:
            pass  # the shim is gone (SIGKILLed with its SuperNode)
        child.conn.close()

    def _handle_signals(self, received: Sequence[int], command: subprocess.Popen[bytes] | None) -> bool:
        """Wrapper mode: pass signals on to the command (its end ends us). Else: stop."""
        if not received:
            return False
        if command is None:
            return True
        for number in received:
            if number == signal.SIGINT and _terminal_sent_it_to_all():
                continue
            try:
                command.send_signal(number)
            except ProcessLookupError:
                pass
        return False

    @staticmethod
    def _exit_code(command: subprocess.Popen[bytes] | None) -> int:
        if command is None:
            return 0
        code = command.wait()
        return code if code >= 0 else 128 - code


def _terminal_sent_it_to_all() -> bool:
    """Ctrl-C in a terminal reaches the whole foreground group, the wrapped command included."""
    try:
        return os.tcgetpgrp(sys.stdin.fileno()) == os.getpgrp()
    except (OSError, ValueError, AttributeError):
        return False


def start_parent(
    folder: WarmFolder, modules: Sequence[str], exit_with: Sequence[int], command: Sequence[str]
) -> ChildStart | int:
    """Preload, settle, serve: the parent's whole life (ChildStart returns only in a forked child)."""
    preloaded = preload(modules)
    settle()
    gc.freeze()  # children's garbage collections leave the parent's objects (and their pages) alone
    problem = unsafe_state(preloaded)
    if problem is not None:
        logger.warning("warm start: %s; every ClientApp will start cold", problem)
    return WarmParent(folder, preloaded, exit_with, command).serve()
