"""What the warm parent preloads, and whether a fork from it is safe and exact for a request.

The parent holds imports only: no torch op, no gRPC channel, no Python thread, so a fork copies a
state the child can use. ``unsafe_state`` checks that this is still so before each fork; ``refusal``
checks that the requesting shim is one a forked child can serve exactly like a cold process (same
user, namespaces, Flower and load-time environment). Either reason sends the shim cold.

The one native thread that ``import torch`` leaves is OpenBLAS's worker (numpy's bundled
``libscipy_openblas``, cores - 1 workers started when the library loads). OpenBLAS registers a
``pthread_atfork`` handler that stops its pool before any fork and restarts it lazily, so a child
never inherits a half-copied pool; one throwaway fork after preloading (``settle``) stops it for
good here, and from then on the parent must be exactly one thread at every fork.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
