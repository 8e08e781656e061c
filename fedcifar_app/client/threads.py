"""How many threads torch may use in one ClientApp process.

In a deployment a SuperNode starts one `flwr-clientapp` process per message, and
several SuperNodes often share one machine (a demo, tests, one data owner with
several sites). torch gives every process one thread per core by default, so ten
ClientApps on two cores run twenty busy OpenMP threads that mostly wait on each
other. Each ClientApp should use its share: cores / ClientApps running at once.

Where the share comes from, first match wins:
1. node config `torch-threads=N` (`flower-supernode --node-config "... torch-threads=1"`);
2. OMP_NUM_THREADS in the environment (Ray sets it in simulation, `fedcifar-deploy up`
   sets it for its SuperNodes): torch already follows it, nothing to do. A cold process
   reads it when torch loads; a ClientApp forked from the warm parent, which loaded torch
   with its own environment, gets the count a cold process would have set before Flower
   runs (client/warm/child.py: thread_settings), so the rule holds there too;
3. otherwise the cores this process may use / the `flower-supernode` processes running
   on this machine (each runs one ClientApp at a time for a run).

Flower-free and torch-free except `size_torch_threads`, so `fedcifar-deploy` can share
the arithmetic without importing torch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from ..errors import ConfigError

TORCH_THREADS_KEY = "torch-threads"
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
SUPERNODE_EXECUTABLE = "flower-supernode"


def available_cores() -> int:
    """Cores this process may run on (respects taskset/cgroup affinity, unlike os.cpu_count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads_per_process(cores: int, concurrent_processes: int) -> int:
    """Each process's share of `cores`, at least one thread."""
    return max(1, cores // max(1, concurrent_processes))


def count_supernodes(proc: Path = Path("/proc")) -> int:
    """`flower-supernode` processes on this machine (0 where /proc is missing).

    A console script runs as `python .../flower-supernode ...`, so the name is looked
    for in the first two arguments of each command line.
    """
    count = 0
    try:
        entries = list(proc.iterdir())
    except OSError:
        return 0
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")[:2]
        except OSError:
            continue  # the process ended while we looked
        if any(os.path.basename(arg.decode(errors="replace")) == SUPERNODE_EXECUTABLE for arg in argv):
            count += 1
    return count


def choose_torch_threads(
    node_config: Mapping[str, object], environ: Mapping[str, str], cores: int, supernodes: int
) -> int | None:
    """The thread count to set, or None when torch already follows OMP_NUM_THREADS.

    ConfigError names a bad node config value and how to fix it (the ClientApp replies it in one line).
    """
    explicit = node_config.get(TORCH_THREADS_KEY)
    if explicit is not None:
        if isinstance(explicit, bool) or not isinstance(explicit, int) or explicit < 1:
            raise ConfigError(
                f"node config {TORCH_THREADS_KEY}={explicit!r} must be an integer >= 1 "
                f'(e.g. --node-config "partition-id=0 num-partitions=10 {TORCH_THREADS_KEY}=1")'
            )
        return explicit
    if environ.get("OMP_NUM_THREADS", "").strip():
        return None
    return threads_per_process(cores, supernodes)


def size_torch_threads(node_config: Mapping[str, object]) -> int:
    """Set torch's intra-op threads to this ClientApp's share; returns the count torch now uses."""
    import torch  # the ClientApp has imported it already; fedcifar-deploy never calls this

    threads = choose_torch_threads(node_config, os.environ, available_cores(), count_supernodes())
    if threads is not None and threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return torch.get_num_threads()
