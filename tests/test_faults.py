"""Failure behaviour of a real local deployment.

Each test starts real Flower processes on free loopback ports (`fedcifar-deploy up`
in a tmp folder; tests/support/deployment.py), breaks something on purpose, and
judges the run by what it wrote (status.json, metrics.json, checkpoint.pt) and by
the server log that `flwr run --stream` prints; never by the exit code of `flwr run`.

- a SuperNode whose data-path holds a corrupt parquet file,
- a SuperNode killed (SIGKILL on its process group) in round 2, then restarted,
- the SuperLink with its ServerApp killed after round 2's checkpoint, then a resumed run,
- too few SuperNodes for min-available-nodes.

Two deployments are shared by the tests of this module (3 SuperNodes each); every
process started here is ended by process group in a finalizer. Every wait is bounded.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator

import pytest
import torch
from support.datasets import make_parquet_dataset
from support.deployment import LocalDeployment
from support.flwr_run import flwr_environment

from fedcifar_app.model import Net

pytestmark = pytest.mark.slow  # real processes: minutes on two cores

# One WARNING per failing node and round, as the strategy writes it.
FAILURE_LINE = re.compile(r"WARNING\s*:\s+round (\d+) (train|evaluate): node (.+?) failed: (.*)")
NODES = 3
ROUND_TIMEOUT_S = 150  # longer than Flower's heartbeat deadline, to show which one ends a round


def run_config(output_dir, rounds: int, nodes: str, *, node_wait_timeout: float = 60, extra: str = "") -> str:
    """A small synthetic run; ONE string, since `flwr run` refuses a key given twice."""
    return (
        f"num-server-rounds={rounds} dataset='synthetic' output-dir='{output_dir}' {nodes} "
        f"node-wait-timeout={node_wait_timeout:g} round-timeout={ROUND_TIMEOUT_S} {extra}"
    ).strip()


def failure_lines(output: str) -> list[tuple[int, str, str, str]]:
    return [(int(m[1]), m[2], m[3], m[4]) for m in map(FAILURE_LINE.search, output.splitlines()) if m]


def start_federation(tmp_path_factory, name: str, data_paths=None) -> LocalDeployment:
    """A deployment of NODES SuperNodes (their own data folders when `data_paths` is given), started."""
    root = tmp_path_factory.mktemp(name)
    env = flwr_environment(tmp_path_factory.getbasetemp() / "fedcifar-cache")
    federation = LocalDeployment(root, env, nodes=NODES, spare_ports=0, data_paths=data_paths or ())
    try:
        federation.up()
    except BaseException:
        federation.teardown()
        raise
    return federation


@pytest.fixture(scope="module")
def broken_data_federation(tmp_path_factory) -> Iterator[LocalDeployment]:
    """Three SuperNodes on their own parquet folders; supernode-2's train file is garbage bytes."""
    data = tmp_path_factory.mktemp("node-data")
    good = [make_parquet_dataset(data / f"good-{i}", n_train=60, n_test=20, seed=i) for i in range(2)]
    broken = make_parquet_dataset(data / "broken", n_train=20, n_test=10)
    (broken / "train-00000-of-00001.parquet").write_bytes(b"PAR1 these bytes are not a parquet file")
    federation = start_federation(tmp_path_factory, "broken-data", [*good, broken])
    try:
        yield federation
    finally:
        federation.teardown()


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> Iterator[LocalDeployment]:
    """Three SuperNodes, partition-id=i num-partitions=3 of the run's dataset."""
    federation = start_federation(tmp_path_factory, "federation")
    try:
        yield federation
    finally:
        federation.teardown()


# --------------------------------------------------------------------------- item 2: a node with broken data
def test_broken_node_data_is_named_each_round_and_the_run_completes(broken_data_federation, tmp_path):
    """min-train-nodes=2 of 3: the run completes on the two good nodes; the broken one is
    named with its error once per round (and once by the data check)."""
    federation = broken_data_federation
    broken_id = federation.node_id("supernode-2")
    run = federation.run(
        run_config(tmp_path / "out", 2, "min-available-nodes=3 min-train-nodes=2 min-evaluate-nodes=1"),
        tmp_path / "out",
    )
    output = run.output
    assert run.status["status"] == "completed", output[-3000:]
    metrics = run.metrics
    assert [row["round"] for row in metrics] == [0, 1, 2]
    assert all(row["central-accuracy"] is not None for row in metrics)
    assert all(row["train-loss"] is not None for row in metrics[1:])

    broken_file = str(federation.data_paths[2] / "train-00000-of-00001.parquet")
    lines = failure_lines(output)
    assert sorted(round_ for round_, *_ in lines) == [1, 2], output[-4000:]  # once per round, only it
    for _, _, node, reason in lines:
        assert node == str(broken_id) and reason.startswith(f"cannot read {broken_file}"), (node, reason)
    assert f"data check: node {broken_id}: cannot read {broken_file}" in output
    assert "Data check: 2 nodes ready" in output
    assert "ERROR" not in output and "Traceback" not in output


def test_broken_node_data_stops_the_run_before_training_when_every_node_is_needed(broken_data_federation, tmp_path):
    federation = broken_data_federation
    broken_id = federation.node_id("supernode-2")
    run = federation.run(
        run_config(tmp_path / "out", 2, "min-available-nodes=3 min-train-nodes=3 min-evaluate-nodes=1"),
        tmp_path / "out",
    )
    expected = (
        f"data check failed on 1 of 3 nodes, 2 usable but min-train-nodes/min-evaluate-nodes need 3: "
        f"node {broken_id}: cannot read {federation.data_paths[2] / 'train-00000-of-00001.parquet'}"
    )
    status = run.status
    assert status["status"] == "failed" and status["reason"].startswith(expected), status
    error_lines = [line for line in run.output.splitlines() if "ERROR" in line]
    assert len(error_lines) == 1 and expected in error_lines[0], run.output[-3000:]
    assert run.metrics == [] and not (run.folder / "checkpoint.pt").exists()  # nothing trained
    assert "Traceback" not in run.output


# --------------------------------------------------------------------------- item 3: a SuperNode killed mid-run
def test_killed_supernode_is_reported_within_the_heartbeat_deadline_and_can_rejoin(federation, tmp_path):
    """SIGKILL one of three SuperNodes in round 2 of 2. Flower notices the missing heartbeats
    (30 s interval, patience 2) and answers for the node with NODE_UNAVAILABLE, so the round
    ends well before round-timeout and the run completes on the other two nodes. The node,
    started again with the same flags, is accepted as a new node and trains in the next run."""
    federation.heal()
    run = federation.start_run(
        run_config(tmp_path / "out", 2, "min-available-nodes=2 min-train-nodes=2 min-evaluate-nodes=1"),
        tmp_path / "out",
    )
    run.wait_for("round 1 in metrics.json", lambda: any(row["round"] == 1 for row in run.metrics))
    federation.kill("supernode-2")
    killed_at = time.monotonic()
    run.wait_for("the dead node named in the log", lambda: failure_lines(run.output), ROUND_TIMEOUT_S + 30)
    named_after = time.monotonic() - killed_at
    output = run.wait(timeout_s=ROUND_TIMEOUT_S + 60).output
    after_kill = time.monotonic() - killed_at

    assert run.status["status"] == "completed", output[-3000:]
    assert [row["round"] for row in run.metrics] == [0, 1, 2]
    lines = failure_lines(output)
    assert len(lines) == 1, output[-4000:]
    round_, stage, node, reason = lines[0]
    assert (round_, node) == (2, "partition 2/3"), lines
    assert reason.startswith("Error: Node Unavailable"), reason  # Flower's answer, not our timeout
    assert named_after < ROUND_TIMEOUT_S, f"the dead node was named {named_after:.0f} s after the kill"
    print(f"\nkilled SuperNode: named {named_after:.1f} s, run ended {after_kill:.1f} s after the kill")

    killed_id = federation.node_id("supernode-2")
    federation.restart_node("supernode-2")
    status = {int(node["node-id"]): node["status"] for node in federation.supernodes()}
    assert status.pop(killed_id) == "offline", status
    assert sorted(status.values()) == ["online"] * 3, status  # the two others and the restarted one
    assert federation.node_id("supernode-2") in status

    # The node rejoins: a run that needs all three nodes to train completes, and the restarted
    # process's own log shows it received that run's train message.
    rejoin = federation.run(
        run_config(tmp_path / "rejoin", 1, "min-available-nodes=3 min-train-nodes=3 min-evaluate-nodes=1"),
        tmp_path / "rejoin",
    )
    assert rejoin.status["status"] == "completed" and not failure_lines(rejoin.output), rejoin.output[-3000:]
    restarted_log = federation.node_log("supernode-2").read_text()
    assert f"[RUN {rejoin.run_id}]" in restarted_log and "Receiving: train message" in restarted_log


# --------------------------------------------------------------------------- item 4: server crash and resume
def test_superlink_crash_keeps_the_last_checkpoint_and_resume_finishes_the_run(federation, tmp_path):
    """SIGKILL the SuperLink's process group (SuperLink, SuperExec and the running
    flwr-serverapp) after round 2's checkpoint; restart the deployment; resume-from the
    run folder: the new folder holds rounds 0..4 once each."""
    federation.heal()
    nodes = "min-available-nodes=3 min-train-nodes=3 min-evaluate-nodes=1"
    first = federation.start_run(run_config(tmp_path / "first", 4, nodes), tmp_path / "first")
    first.wait_for("round 2's checkpoint", lambda: first.checkpoint_round() >= 2)
    assert "Data check: 3 nodes ready" in first.output and not failure_lines(first.output), first.output
    federation.kill("superlink")
    try:
        first.process.wait(timeout=30)  # the CLI loses its log stream
    except subprocess.TimeoutExpired:
        first.kill()

    folder = first.folder
    # Nobody was left to write "failed": status.json still says running.
    assert first.status["status"] == "running"
    checkpoint = torch.load(folder / "checkpoint.pt", map_location="cpu", weights_only=True)
    Net().load_state_dict(checkpoint["weights"])
    rows = first.metrics
    assert checkpoint["round"] == rows[-1]["round"] >= 2, (checkpoint["round"], rows)
    assert [row["round"] for row in checkpoint["metrics"]] == [row["round"] for row in rows]

    federation.down()  # the SuperNodes lost their SuperLink: they exit or hang
    federation.up()
    resumed = federation.run(
        run_config(tmp_path / "resumed", 4, nodes, extra=f"resume-from='{folder}'"), tmp_path / "resumed"
    )
    assert resumed.status["status"] == "completed", resumed.output[-3000:]
    assert [row["round"] for row in resumed.metrics] == [0, 1, 2, 3, 4]
    assert resumed.metrics[: len(rows)] == rows  # the earlier rounds, as the crashed run wrote them
    assert f"Resuming {folder} after round {checkpoint['round']}" in resumed.output


# --------------------------------------------------------------------------- item 5: waiting for nodes
def test_too_few_supernodes_fail_after_node_wait_timeout(federation, tmp_path):
    """Three SuperNodes connected, four needed, node-wait-timeout=5: the server says what it
    waits for, gives up after about 5 s with one ERROR line, and status.json says why."""
    federation.heal()
    run = federation.run(
        run_config(
            tmp_path / "out", 2, "min-available-nodes=4 min-train-nodes=2 min-evaluate-nodes=1", node_wait_timeout=5
        ),
        tmp_path / "out",
    )
    expected = (
        "only 3 of the 4 SuperNodes needed connected within node-wait-timeout=5s: "
        "start more SuperNodes, lower min-available-nodes, or raise node-wait-timeout"
    )
    assert "Waiting for SuperNodes: 3 connected, 4 needed (giving up in 5s)" in run.output, run.output[-3000:]
    status = run.status
    assert status == {**status, "status": "failed", "reason": expected}
    error_lines = [line for line in run.output.splitlines() if "ERROR" in line]
    assert len(error_lines) == 1 and expected in error_lines[0], run.output[-3000:]
    # config.json is written just before the wait, status.json "failed" right after it.
    waited = (run.folder / "status.json").stat().st_mtime - (run.folder / "config.json").stat().st_mtime
    assert 4.5 <= waited <= 15, waited
    assert run.metrics == []
