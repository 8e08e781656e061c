"""A Ray cluster across "hosts" of one machine: network namespaces that also have their own /tmp,
/dev/shm, home folder and host name, as separate machines would.

Why each host needs its own /tmp and /dev/shm: Ray keeps its session folder, sockets and node
address under /tmp/ray and its object store in /dev/shm, and a worker node takes the head's
session path; two Ray nodes sharing those folders collide and the worker times out at start-up.
So every command typed on a host runs as `ip netns exec <ns> unshare --uts sh -c '...'`: a fresh
mount namespace (`ip netns exec` makes one, private to that command) in which the host's own
folders are bound over /tmp and /dev/shm, and a UTS namespace with the host's name. Every command
typed on the same host sees the same folders, so `ray status` or `flwr run` on the head find the
head's Ray. Nothing is mounted outside those private namespaces: ending the processes ends the mounts.

The folders live under the test's tmp_path (``<root>/<host>/tmp``) and /dev/shm/<ns>; paths the hosts
must all see at the same place (this checkout, its venv) are bound into each host's /tmp when they
lie under /tmp. Addresses come from a private /24 that exists only inside the namespaces.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .flwr_run import BIN, PROJECT
from .netns import Network

SUBNET = "10.201.18"  # this test's private /24 (the multi-host deployment test uses 10.201.7)
HEAD_PORT = 6379  # Ray's default GCS port; free inside a namespace of our own
# Small Ray daemons: 2 cores and 24 GB shared by everything on this machine.
SMALL_RAY = ("--object-store-memory=80000000", "--disable-usage-stats")
HEAD_ONLY = ("--include-dashboard=false",)  # `ray start` refuses it on a worker
# Environment the test process may carry that must not reach a host (each host has its own).
NOT_INHERITED = (
    *("FEDCIFAR_CACHE_DIR", "XDG_CACHE_HOME", "RAY_ADDRESS", "FLWR_HOME", "PYTEST_CURRENT_TEST"),
    *("OMP_NUM_THREADS", "MKL_NUM_THREADS"),  # a host's thread settings are its own
)
ENTER_HOST = (
    'set -e; hostname "$FC_HOST"; '
    'for keep in $FC_KEEP; do mount --bind "$keep" "$FC_TMP${keep#/tmp}"; done; '
    'mount --rbind "$FC_TMP" /tmp; mount --bind "$FC_SHM" /dev/shm; '
    'unset FC_HOST FC_TMP FC_SHM FC_KEEP; exec "$@"'
)


class RayHosts:
    """Hosts on one switch; ``on(host, argv)`` types a command on one, ``start_*`` bring up Ray."""

    def __init__(self, root: Path, subnet: str = SUBNET) -> None:
        self.root = root
        self.network = Network(subnet=subnet, tag="fcr")
        self.addresses: dict[str, str] = {}
        self._shm: list[Path] = []
        # Paths every host must see where this machine has them (the code and the Python environment).
        self.keep = [p for p in dict.fromkeys((PROJECT, Path(sys.prefix))) if Path("/tmp") in p.parents]

    def add(self, host: str, number: int) -> str:
        """A host at SUBNET.number with empty /tmp, /dev/shm and home; its address."""
        address = self.network.add_host(host, number)
        self.addresses[host] = address
        tmp = self.tmp(host)
        (tmp / "home").mkdir(parents=True)
        for path in self.keep:  # bound there, then seen at `path` once the host's tmp is its /tmp
            (tmp / path.relative_to("/tmp")).mkdir(parents=True, exist_ok=True)
        shm = Path("/dev/shm") / self.network.namespace(host)
        shm.mkdir()
        self._shm.append(shm)
        return address

    def tmp(self, host: str) -> Path:
        """The host's /tmp, as this (outside) process sees it."""
        return self.root / host / "tmp"

    def outside(self, host: str, path: str | Path) -> Path:
        """Where a path under the host's /tmp lies for this process."""
        return self.tmp(host) / Path(path).relative_to("/tmp")

    def environment(self, host: str) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if key not in NOT_INHERITED}
        env.update(
            HOME="/tmp/home",  # so ~/.cache/fedcifar_app, ~/.flwr and Ray's user files are the host's own
            PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            RAY_USAGE_STATS_ENABLED="0",
            FC_HOST=host,
            FC_TMP=str(self.tmp(host)),
            FC_SHM=str(Path("/dev/shm") / self.network.namespace(host)),
            FC_KEEP=" ".join(str(path) for path in self.keep),
        )
        return env

    def prefix(self, host: str) -> list[str]:
        """argv prefix that runs a command on ``host`` (its network, /tmp, /dev/shm and name)."""
        return [*self.network.exec_prefix(host), "unshare", "--uts", "sh", "-c", ENTER_HOST, "enter-host"]

    def popen(self, host: str, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """Start ``argv`` on ``host`` in its own session (its output to ``kwargs``' stdout)."""
        return subprocess.Popen(
            [*self.prefix(host), *argv],
            env=self.environment(host),
            cwd=kwargs.pop("cwd", PROJECT),
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            **kwargs,
        )

    def on(self, host: str, argv: Sequence[str], timeout_s: float = 120) -> subprocess.CompletedProcess:
        """Run ``argv`` on ``host`` and wait (bounded)."""
        return subprocess.run(
            [*self.prefix(host), *argv],
            env=self.environment(host),
            cwd=PROJECT,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            stdin=subprocess.DEVNULL,
        )

    def ray_start(self, host: str, argv: Sequence[str]) -> None:
        """A `ray start ...` command typed on ``host``; it must succeed."""
        started = self.on(host, [*argv, *SMALL_RAY, *(HEAD_ONLY if "--head" in argv else ())])
        assert started.returncode == 0, f"{host}: {' '.join(argv)}\n{started.stdout[-2000:]}\n{started.stderr[-2000:]}"

    def view(self, host: str = "head") -> tuple[int, float]:
        """(nodes listed Active, CPUs in Total Usage) as `ray status` on ``host`` shows them; (0, 0) while
        it cannot tell. A host Ray has declared dead stays under Active, with no resources."""
        status = self.on(host, ["ray", "status"], timeout_s=60).stdout
        if "Active:" not in status:
            return 0, 0.0
        active = status.split("Active:", 1)[1].split("Pending:", 1)[0]
        nodes = sum(line.strip().startswith("1 node_") for line in active.splitlines())
        cpus = re.search(r"^\s*[\d.]+/([\d.]+) CPU\b", status.split("Total Usage:", 1)[-1], re.MULTILINE)
        return nodes, float(cpus[1]) if cpus else 0.0

    def wait_for(self, nodes: int, cpus: float, timeout_s: float = 90) -> None:
        """Until `ray status` lists ``nodes`` nodes offering ``cpus`` CPUs in all."""
        deadline = time.monotonic() + timeout_s
        while (seen := self.view()) != (nodes, cpus):
            assert time.monotonic() < deadline, f"`ray status`: {seen} (nodes, CPUs), expected {(nodes, cpus)}"
            time.sleep(1)

    def pids(self, host: str, executable: str) -> list[int]:
        """Processes on ``host`` whose executable (argv[0]) is named ``executable``."""
        listed = subprocess.run(
            ["ip", "netns", "pids", self.network.namespace(host)], capture_output=True, text=True, timeout=30
        )
        found = []
        for pid in map(int, listed.stdout.split()):
            try:
                argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0].decode(errors="replace")
            except OSError:
                continue
            if os.path.basename(argv0) == executable:
                found.append(pid)
        return found

    def close(self) -> None:
        """SIGKILL everything still running on the hosts, delete the namespaces and the /dev/shm folders."""
        try:
            self.network.close()
        finally:
            for shm in self._shm:
                shutil.rmtree(shm, ignore_errors=True)

    def leftovers(self) -> list[str]:
        return self.network.leftovers() + [str(shm) for shm in self._shm if shm.exists()]
