"""A forked child: become the process a cold ``flwr-clientapp`` would be, then run Flower's code.

The shim sent what a cold process inherits from SuperExec: argv, environment, working directory,
stdio, umask, CPU affinity, nice value, resource limits and ignored signals. The child takes all of
them on, says "ready", and runs only after the shim's "go" (protocol.py), so a start happens once.

Two things a fork does not reset by itself:
- Thread counts. libgomp and MKL read OMP_NUM_THREADS / MKL_NUM_THREADS when they load, in the
  parent; OpenBLAS likewise. When the SuperNode's values (or CPU affinity) differ from the parent's,
  the child sets the counts a cold process would get (``torch_threads``, ``openblas_threads``).
- Modules. The parent's own code is ``fedcifar_app.client.warm``, so ``fedcifar_app`` sits in
  ``sys.modules``; Flower's ``load_app`` imports a module only when it is not there yet. The child
  drops every ``fedcifar_app`` module first, so Flower imports the app from the FAB it installed for
  the run, exactly as in a cold process.
"""

from __future__ import annotations

import atexit
import ctypes
import importlib
import io
import os
import resource
import selectors
import signal
import socket
import sys
import threading
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

from ...errors import first_line
from . import protocol

if TYPE_CHECKING:
    from .fork_safety import Preloaded

APP_PACKAGE = "fedcifar_app"
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS")
UNCATCHABLE = (signal.SIGKILL, signal.SIGSTOP)


def _count(value: str | None) -> int | None:
    """A thread-count variable's number (its first item, as OpenMP lists nest), None if unset or invalid."""
    text = (value or "").split(",")[0].strip()
    return int(text) if text.isdigit() and int(text) > 0 else None


def torch_threads(environ: Mapping[str, str], allowed_cores: int, machine_cores: int) -> int:
    """Intra-op threads a cold process gets from torch (OpenMP + MKL build), measured on this wheel:
    MKL_NUM_THREADS, else OMP_NUM_THREADS, at most the machine's cores; without either, the cores this
    process may run on."""
    for name in ("MKL_NUM_THREADS", "OMP_NUM_THREADS"):
        count = _count(environ.get(name))
        if count is not None:
            return min(count, machine_cores)
    return allowed_cores


def openblas_threads(environ: Mapping[str, str], allowed_cores: int, machine_cores: int) -> int:
    """OpenBLAS's threads in a cold process: OPENBLAS_NUM_THREADS, GOTO_NUM_THREADS, OMP_NUM_THREADS
    (first set wins, at most the machine's cores), else the cores this process may run on."""
    for name in ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS"):
        count = _count(environ.get(name))
        if count is not None:
            return min(count, machine_cores)
    return allowed_cores


def set_openblas_threads(count: int) -> None:
    """Set the thread count of every OpenBLAS this process has loaded (numpy's bundled one)."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            libraries = {line.split()[-1] for line in maps if "openblas" in line.rsplit("/", 1)[-1].lower()}
    except OSError:
        return
    for path in libraries:
        try:
            library = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        except OSError:
            continue
        for symbol in ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_", "openblas_set_num_threads"):
            setter = getattr(library, symbol, None)
            if setter is not None:
                setter(ctypes.c_int(count))
                break


def thread_settings(environ: Mapping[str, str], affinity: frozenset[int], preloaded: Preloaded) -> None:
    """Give torch and OpenBLAS the thread counts a cold process would have, where they can differ."""
    parent = {name: preloaded.start_environ.get(name) for name in THREAD_VARIABLES}
    ours = {name: environ.get(name) for name in THREAD_VARIABLES}
    if parent == ours and affinity == preloaded.affinity:
        return  # the libraries loaded with these very settings
    machine_cores = os.cpu_count() or len(affinity)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(torch_threads(environ, len(affinity), machine_cores))
    set_openblas_threads(openblas_threads(environ, len(affinity), machine_cores))


def forget_app_modules() -> None:
    """Drop ``fedcifar_app`` from sys.modules, so Flower imports the app from the run's FAB."""
    for name in [name for name in sys.modules if name == APP_PACKAGE or name.startswith(APP_PACKAGE + ".")]:
        del sys.modules[name]
    importlib.invalidate_caches()


def exit_code(value: object) -> int:
    """The exit status ``sys.exit(value)`` gives: None is 0, an int itself, anything else printed and 1."""
    if value is None:
        return 0
    if isinstance(value, int):
        return value & 0xFF
    print(value, file=sys.stderr)
    return 1


def exit_fast(code: int) -> NoReturn:
    """End like the interpreter, without tearing down the parent's ~2,000 modules object by object.

    A normal exit joins non-daemon threads, runs atexit handlers and flushes stdio; then it frees every
    module, which here costs ~1 CPU-s and writes to every page shared with the parent. The first three
    are what anyone can observe, so they happen; the teardown is left to the kernel (as
    multiprocessing's forked children do).
    """
    threading._shutdown()  # type: ignore[attr-defined]  # the interpreter's own join of non-daemon threads
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if code < 0:
        if -code not in (signal.SIGKILL, signal.SIGSTOP):  # those two have no handler to reset
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code)


def watch_shim(pid: int) -> None:
    """End this process when its shim ends, as a cold flwr-clientapp ends with its own process."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:  # gone already (or, never expected past the parent's checks, not a pid of ours to watch)
        os.kill(os.getpid(), signal.SIGKILL)
        return

    def wait() -> None:
        selector = selectors.DefaultSelector()
        selector.register(pidfd, selectors.EVENT_READ)
        selector.select()
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=wait, name="fedcifar-warm-shim-watch", daemon=True).start()


@dataclass
class ChildStart:
    """A forked child's start: `run` takes on the shim's process state, then runs flwr-clientapp."""

    request: dict[str, Any]
    stdio: list[int]
    conn: socket.socket
    shim_pid: int
    preloaded: Preloaded
    parent_resources: list[Any]

    def drop_parent(self, fds: Sequence[int]) -> None:
        """Close what belongs to the parent: its selector, sockets, pidfds, signal wake-up."""
        signal.set_wakeup_fd(-1)
        for item in self.parent_resources:
            item.close()
        for fd in fds:
            os.close(fd)

    def run(self) -> NoReturn:
        """Run Flower's `flwr-clientapp` entry function as this message's process, then exit like it."""
        try:
            self._take_on_process_state()
        except Exception as err:  # noqa: BLE001 - any failure means: not exactly like cold, so cold
            self._refuse(f"the warm child could not take on the SuperNode's process state ({first_line(err)})")
        try:
            protocol.send(self.conn, protocol.READY, pid=os.getpid())
            reply, _ = protocol.receive(self.conn)
        except OSError:
            reply = None
        if reply is None or reply["kind"] != protocol.GO:
            os._exit(0)  # the shim gave up and started cold: never touch its message
        self.conn.close()
        watch_shim(self.shim_pid)
        forget_app_modules()
        try:
            code = exit_code(self.preloaded.clientapp())
        except SystemExit as stop:
            code = exit_code(stop.code)
        except KeyboardInterrupt:
            traceback.print_exc()
            exit_fast(-signal.SIGINT)  # as the interpreter does: the caller sees SIGINT
        except BaseException:  # noqa: BLE001 - printed and exit code 1, as an uncaught exception
            traceback.print_exc()
            code = 1
        exit_fast(code)

    def _refuse(self, reason: str) -> None:
        try:
            protocol.send(self.conn, protocol.REFUSE, reason=reason)
        except OSError:
            pass
        os._exit(0)

    def _take_on_process_state(self) -> None:
        request = self.request
        ignored = set(request["ignored_signals"])
        for number in signal.valid_signals():
            if number in UNCATCHABLE:
                continue
            handler: Any
            if number in ignored:
                handler = signal.SIG_IGN
            elif number == signal.SIGINT:
                handler = signal.default_int_handler
            else:
                handler = signal.SIG_DFL
            try:
                signal.signal(number, handler)
            except (OSError, ValueError):
                pass  # signals the C library reserves
        for target, fd in enumerate(self.stdio):
            os.dup2(fd, target)
            os.close(fd)
        self.stdio = []
        environ = dict(entry.partition("=")[::2] for entry in request["environ"])
        if not environ.get("PYTHONUNBUFFERED") and isinstance(sys.stdout, io.TextIOWrapper):
            sys.stdout.reconfigure(line_buffering=os.isatty(1))  # what the interpreter decides at start
        os.chdir(request["cwd"])
        os.umask(int(request["umask"]))
        nice = int(request["nice"])
        if os.getpriority(os.PRIO_PROCESS, 0) != nice:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
        affinity = frozenset(int(cpu) for cpu in request["affinity"])
        if frozenset(os.sched_getaffinity(0)) != affinity:
            os.sched_setaffinity(0, affinity)
        for name, (soft, hard) in request["rlimits"].items():
            kind = getattr(resource, name, None)
            if kind is not None and resource.getrlimit(kind) != (soft, hard):
                resource.setrlimit(kind, (soft, hard))
        os.environ.clear()
        os.environ.update(environ)
        for name, value in self.preloaded.import_environ.items():
            os.environ.setdefault(name, value)  # what the preloaded imports would set (GRPC_VERBOSITY ...)
        sys.argv = [str(arg) for arg in request["argv"]]
        sys.path[0] = os.path.dirname(os.path.realpath(sys.argv[0]))
        thread_settings(os.environ, affinity, self.preloaded)
        numpy = sys.modules.get("numpy")
        if numpy is not None:
            numpy.random.seed()  # a cold process seeds numpy's global generator from the OS; a fork copies it
