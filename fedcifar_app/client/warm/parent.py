"""The warm parent: import torch, numpy and Flower's ClientApp runtime once, then fork per message.

Before each fork it checks that its own state is still safe to copy and that the requesting shim is
one it may serve (fork_safety.py); when not, it refuses and the shim starts Flower's
``flwr-clientapp`` cold. It never imports the app itself: the child loads the app from the FAB that
Flower installs for the run (child.py).

One process, one thread, one ``selectors`` loop: the listening socket, the connections that have
not sent their request yet, a pidfd per running child (its exit code goes back to its shim), the
pidfds of the SuperNodes it serves (it ends when they all have), and a wake-up socket for signals.
"""

from __future__ import annotations

import gc
import logging
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from ...logs import APP_LOGGER
from . import protocol
from .child import ChildStart
from .folder import WarmFolder
from .fork_safety import Preloaded, preload, refusal, settle, unsafe_state

logger = logging.getLogger(APP_LOGGER)

PENDING_REQUEST_TIMEOUT_S = 30.0
DRAIN_S = 5.0  # after the last SuperNode ends, running children may still report their exit
SO_PEERCRED_FORMAT = "3i"  # struct ucred: pid, uid, gid


def peer_credentials(conn: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end, from the kernel (SO_PEERCRED)."""
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize(SO_PEERCRED_FORMAT))
    pid, uid, gid = struct.unpack(SO_PEERCRED_FORMAT, raw)
    return pid, uid, gid


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
