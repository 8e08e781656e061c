"""docs/simulation-cluster.md across "hosts": `flwr run .` on a Ray cluster of a head and two workers.

Each host is a network namespace with its own /tmp, /dev/shm, home folder, host name and node IP
(tests/support/ray_cluster.py), joined by a bridge in 10.201.18.0/24, which exists only inside the
namespaces this test creates; nothing else is contacted. The `ray start`, `ray status` and `flwr run`
commands are the page's own (checked word for word), with the page's example addresses and dataset
replaced by the test's and small-machine flags added (--num-cpus, a small object store). Every
namespace, mount and process is gone at the end, also when a test fails; `ray stop` is never typed
here (it ends every Ray process of the machine, other tests' too).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.datasets import make_parquet_dataset
from support.flwr_run import PROJECT, FlwrRun
from support.netns import netns_unavailable
from support.ray_cluster import RayHosts

from fedcifar_app import pyproject

pytestmark = pytest.mark.slow

PAGE = (PROJECT / "docs" / "simulation-cluster.md").read_text(encoding="utf-8")
HEAD_START = "ray start --head --node-ip-address=10.0.0.1 --port=6379"
WORKER_START = "ray start --address=10.0.0.1:6379 --node-ip-address=10.0.0.2"
STATUS = "ray status"
RUN = "flwr run . ray-cluster --run-config \"dataset='/data/cifar10'\""
PAGE_COMMANDS = (HEAD_START, WORKER_START, STATUS, RUN)
WORKERS = ("w1", "w2")
NODES = 6
OUTPUTS = "/tmp/outputs"  # on the head: its own /tmp
DATASET = "/tmp/data/cifar-small"  # on every host, a copy of its own
RESUME_LINE = re.compile(r"resume with: (flwr run .*)$", re.MULTILINE)
DATA_CHECK = re.compile(r"Data check: (\d+) nodes ready on (\d+) hosts \((.*?)\), ")


def test_the_page_shows_these_commands() -> None:
    flat = " ".join(PAGE.replace("\\\n", " ").split())
    for command in PAGE_COMMANDS:
        assert command in flat, f"docs/simulation-cluster.md lacks: {command}"


class Cluster:
    """The page's cluster on the test's hosts: the head at .1, the workers at .2 and .3."""

    def __init__(self, hosts: RayHosts) -> None:
        self.hosts = hosts
        self.head = hosts.add("head", 1)
        for number, worker in enumerate(WORKERS, start=2):
            hosts.add(worker, number)
        self.federation_config = pyproject.federation_override(PROJECT, {"num-supernodes": NODES}, "ray-cluster")

    def start(self) -> None:
        """The page's commands; the head runs no ClientApps here, so every one lands on a worker."""
        self.hosts.ray_start("head", [*self.typed(HEAD_START), "--num-cpus=0"])
        for worker in WORKERS:
            self.hosts.ray_start(worker, [*self.typed(WORKER_START, worker), "--num-cpus=1"])
        self.hosts.wait_for(nodes=1 + len(WORKERS), cpus=len(WORKERS))

    def typed(self, command: str, worker: str = "w1") -> list[str]:
        command = command.replace("10.0.0.1", self.head).replace("10.0.0.2", self.hosts.addresses[worker])
        return shlex.split(command)

    def run(self, run_config: str, name: str, *, federation_config: str | None = None) -> FlwrRun:
        """The page's `flwr run` on the head, with the test's run config and 6 virtual nodes (the
        federation's whole options table restated, as Flower 1.25 needs), started."""
        words = shlex.split(RUN.replace("dataset='/data/cifar10'", run_config))
        assert words[:4] == ["flwr", "run", ".", "ray-cluster"] and words[4] == "--run-config", words
        run = FlwrRun(
            self.hosts.outside("head", OUTPUTS),
            words[5],
            env={**self.hosts.environment("head"), "OMP_NUM_THREADS": "2"},  # the head's; its actors' are their own
            federation=["ray-cluster"],
            federation_config=federation_config or self.federation_config,
            log_path=self.hosts.root / f"{name}.log",
            prefix=self.hosts.prefix("head"),
            output_dir_in_run=OUTPUTS,
        )
        return run.start()

    def daemons(self, host: str) -> list[int]:
        return sorted(self.hosts.pids(host, "raylet") + self.hosts.pids(host, "gcs_server"))


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    hosts = RayHosts(tmp_path / "hosts")
    try:
        yield Cluster(hosts)
    finally:
        hosts.close()  # SIGKILL everything on the hosts, then the namespaces and /dev/shm folders
        assert not hosts.leftovers(), f"left behind: {hosts.leftovers()}"


def run_config(rounds: int, dataset: str = "synthetic", round_timeout: int = 120) -> str:
    return (
        f"dataset='{dataset}' num-server-rounds={rounds} output-dir='{OUTPUTS}' min-available-nodes={NODES} "
        f"min-train-nodes={NODES} min-evaluate-nodes=3 round-timeout={round_timeout}"
    )


def hosts_of_data_check(output: str) -> dict[str, str]:
    """host -> "N node(s), T torch thread(s)" from the data check line."""
    found = DATA_CHECK.search(output)
    assert found, f"no data check line naming hosts:\n{output[-3000:]}"
    return dict(part.rsplit(": ", 1) for part in found[3].split("; "))


def caches(cluster: Cluster, host: str) -> dict[str, int]:
    """The host's decode-cache entries (its own ~/.cache) -> when each was written."""
    root = cluster.hosts.outside(host, "/tmp/home/.cache/fedcifar_app")
    return {meta.parent.name: meta.stat().st_mtime_ns for meta in root.glob("*/meta.json")}


def test_flwr_run_on_the_head_spreads_over_the_workers_stops_and_resumes(cluster: Cluster) -> None:
    """Synthetic data, completed, on both workers; then the real-data path, Ctrl-C after round 1
    ("stopped", the resume line, the cluster untouched), and the printed command finishes it."""
    cluster.start()
    for host in ("head", *WORKERS):  # each host its own copy, at the same path
        make_parquet_dataset(cluster.hosts.outside(host, DATASET), n_train=120, n_test=40)

    first = cluster.run(run_config(2), "synthetic").wait()
    output = first.output
    assert first.status["status"] == "completed", first.log_tail()
    spread = hosts_of_data_check(output)
    assert set(spread) == {f"{w} ({cluster.hosts.addresses[w]})" for w in WORKERS}, spread
    # Ray gives each actor OMP_NUM_THREADS = its CPUs on its own host; the head's 2 never reach it.
    assert all(where.endswith(", 1 torch thread") for where in spread.values()), spread
    assert re.search(r"Served by 2 hosts: w1 \(\S+\) \d+ replies, w2 \(\S+\) \d+ replies", output), output[-2000:]
    assert first.folder.parent == cluster.hosts.outside("head", OUTPUTS)  # the run folder: on the head
    for worker in WORKERS:
        assert not cluster.hosts.outside(worker, OUTPUTS).exists(), f"{worker} wrote {OUTPUTS}"

    daemons = {host: cluster.daemons(host) for host in ("head", *WORKERS)}
    stopped = cluster.run(run_config(2, DATASET), "real-data")
    stopped.wait_for("round 1's checkpoint", lambda: stopped.checkpoint_round() >= 1)
    stopped.signal(signal.SIGINT)  # a terminal's Ctrl-C reaches the group of `flwr run`
    stopped.wait(60)
    status = stopped.status
    assert status["status"] == "stopped" and "Ctrl-C" in status["reason"], status
    printed = RESUME_LINE.findall(stopped.output)
    assert printed == [status["resume-command"]], (printed, status)
    assert {host: cluster.daemons(host) for host in daemons} == daemons, "the stop ended cluster processes"
    assert cluster.hosts.view() == (3, 2.0)
    decoded = {worker: caches(cluster, worker) for worker in WORKERS}
    assert all(len(entries) == 1 for entries in decoded.values()), decoded  # each worker: the train split

    words = shlex.split(printed[0])  # the command as typed, with resume-from: it resumes on the cluster
    assert words[:4] == ["flwr", "run", ".", "ray-cluster"], words
    options = dict(zip(words[4::2], words[5::2], strict=True))
    assert options["--federation-config"] == cluster.federation_config, options
    resumed = cluster.run(options["--run-config"], "resumed", federation_config=options["--federation-config"]).wait()
    assert resumed.status["status"] == "completed", resumed.log_tail()
    assert [row["round"] for row in resumed.metrics] == [0, 1, 2], resumed.metrics
    assert set(hosts_of_data_check(resumed.output)) == set(spread)
    # Each worker decoded its own copy once: the second run mapped what the first one wrote.
    assert {worker: caches(cluster, worker) for worker in WORKERS} == decoded


def test_a_worker_host_lost_mid_run_is_named_and_the_run_resumes_on_the_rest(cluster: Cluster) -> None:
    """w2's raylet is killed after round 1: the run ends at once with one line naming w2 and the
    resume command (not a limp through rounds, not a hang to round-timeout); once Ray has declared
    w2 dead, that command finishes the run on w1 alone. First, data that w2 lacks: the nodes that
    ran there fail the data check with a line that names w2."""
    cluster.start()
    for host in ("head", "w1"):
        make_parquet_dataset(cluster.hosts.outside(host, DATASET), n_train=120, n_test=40)
    missing = cluster.run(run_config(1, DATASET), "missing-on-w2").wait()
    assert missing.status["status"] == "failed", missing.log_tail()
    assert f"(on host w2 ({cluster.hosts.addresses['w2']}))" in missing.output, missing.log_tail()

    run = cluster.run(run_config(3, round_timeout=90), "lost-host")
    run.wait_for("round 1's checkpoint", lambda: run.checkpoint_round() >= 1)
    killed_at = time.monotonic()
    for raylet in cluster.hosts.pids("w2", "raylet"):
        os.kill(raylet, signal.SIGKILL)
    run.wait(90)
    assert time.monotonic() - killed_at < 60, "the run outlived its lost host by a minute"
    status = run.status
    lost = f"the ClientApp actor on host w2 ({cluster.hosts.addresses['w2']}) is gone"
    assert status["status"] == "failed" and lost in status["reason"], status
    errors = [line for line in run.output.splitlines() if re.match(r"ERROR\s*:\s+round \d", line)]
    assert len(errors) == 1 and lost in errors[0], errors
    command = status["reason"].split("; resume with: ", 1)[1]
    assert json.loads((run.folder / "metrics.json").read_text())[-1]["round"] == 1

    cluster.hosts.wait_for(nodes=3, cpus=1.0)  # Ray declares w2 dead after its health checks: its CPU goes
    words = shlex.split(command)
    options = dict(zip(words[4::2], words[5::2], strict=True))
    resumed = cluster.run(options["--run-config"], "on-w1", federation_config=options["--federation-config"]).wait()
    assert resumed.status["status"] == "completed", resumed.log_tail()
    assert [row["round"] for row in resumed.metrics] == [0, 1, 2, 3], resumed.metrics
    assert "w2" not in resumed.output.split("Data check:", 1)[1].split("\n", 1)[0], resumed.log_tail()
