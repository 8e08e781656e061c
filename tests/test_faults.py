"""Failure behaviour of a real local deployment (issue 5, items 2-5).

Each test starts real Flower processes on free loopback ports (`fedcifar-deploy up`
in a tmp folder), breaks something on purpose, and judges the run by what it wrote
(status.json, metrics.json, checkpoint.pt) and by the server log that
`flwr run --stream` prints; never by the exit code of `flwr run`.

- a SuperNode whose data-path holds a corrupt parquet file,
- a SuperNode killed (SIGKILL on its process group) in round 2, then restarted,
- the SuperLink with its ServerApp killed after round 2's checkpoint, then a resumed run,
- too few SuperNodes for min-available-nodes.

Two federations are shared by the tests of this module (3 SuperNodes each); every
process started here runs in its own session and is ended by process group in a
finalizer. Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import make_parquet_dataset

from fedcifar_app import deploy
from fedcifar_app.model import Net

APP_DIR = Path(__file__).resolve().parents[1]
CLI_TIMEOUT_S = 60
RUN_TIMEOUT_S = 300
ANSI = re.compile(r"\x1b\[[0-9;]*m")
# One WARNING per failing node and round, as the strategy writes it.
FAILURE_LINE = re.compile(r"WARNING\s*:\s+round (\d+) (train|evaluate): node (.+?) failed: (.*)")
NODES = 3
ROUND_TIMEOUT_S = 150  # longer than Flower's heartbeat deadline, to show which one ends a round


# --------------------------------------------------------------------------- helpers
def free_port_block(count: int) -> list[int]:
    """`count` consecutive ports that are free on 127.0.0.1 right now."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 60000 - count)
        try:
            for port in range(base, base + count):
                with socket.socket() as probe:
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        return list(range(base, base + count))
    raise RuntimeError(f"no block of {count} free ports found")


def kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_config(output_dir: Path, rounds: int, nodes: str, *, node_wait_timeout: float = 60, extra: str = "") -> str:
    """A small synthetic run; ONE string, since `flwr run` refuses a key given twice."""
    return (
        f"num-server-rounds={rounds} dataset='synthetic' output-dir='{output_dir}' {nodes} "
        f"node-wait-timeout={node_wait_timeout:g} round-timeout={ROUND_TIMEOUT_S} {extra}"
    ).strip()


def failure_lines(output: str) -> list[tuple[int, str, str, str]]:
    return [(int(m[1]), m[2], m[3], m[4]) for m in map(FAILURE_LINE.search, output.splitlines()) if m]


class FlwrRun:
    """A `flwr run . local-deployment --stream` in its own session, output to a file."""

    def __init__(self, command: list[str], log: Path, output_dir: Path):
        self.log = log
        self.output_dir = output_dir
        with log.open("wb") as stream:
            self.process = subprocess.Popen(
                command,
                cwd=APP_DIR,
                stdin=subprocess.DEVNULL,
                stdout=stream,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def output(self) -> str:
        return ANSI.sub("", self.log.read_text(encoding="utf-8", errors="replace"))

    def wait(self, timeout_s: float = RUN_TIMEOUT_S) -> str:
        """The streamed server log once `flwr run` ends; fails the test past `timeout_s`."""
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"flwr run still running after {timeout_s:g} s:\n{self.output[-3000:]}")
        return self.output

    def stop(self) -> None:
        kill_group(self.process.pid)
        self.process.wait(timeout=10)

    @property
    def folder(self) -> Path:
        folders = [p for p in self.output_dir.iterdir() if p.is_dir()] if self.output_dir.exists() else []
        assert len(folders) == 1, f"expected one run folder in {self.output_dir}: {folders}\n{self.output[-3000:]}"
        return folders[0]

    @property
    def status(self) -> dict:
        return json.loads((self.folder / "status.json").read_text())

    @property
    def metrics(self) -> list[dict]:
        path = self.folder / "metrics.json"
        return json.loads(path.read_text()) if path.exists() else []

    def wait_for(self, what: str, condition, timeout_s: float = RUN_TIMEOUT_S) -> None:
        """Poll `condition()` (files are written atomically) until it holds."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ended = self.process.poll() is not None
            try:
                if condition():
                    return
            except (AssertionError, FileNotFoundError, ValueError, RuntimeError, EOFError):
                pass  # no run folder yet, or a file between versions
            if ended:
                pytest.fail(f"flwr run ended before {what}:\n{self.output[-3000:]}")
            time.sleep(0.3)
        pytest.fail(f"no {what} within {timeout_s:g} s:\n{self.output[-3000:]}")


class Federation:
    """A SuperLink and SuperNodes from `fedcifar-deploy up`, plus the processes a test adds."""

    def __init__(self, root: Path, env: dict[str, str], data_paths: list[Path] | None = None):
        self.root = root
        self.env = env
        self.dir = root / "deploy"
        self.data_paths = data_paths or []
        ports = free_port_block(3 + NODES)
        self.superlink_ports = ports[:3]
        self.clientappio_base_port = ports[3]
        self.restarted: dict[str, subprocess.Popen] = {}  # SuperNodes a test started again
        self.runs: list[FlwrRun] = []

    # ---- processes
    def deploy_cli(self, *args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "fedcifar_app.deploy", *args, "--dir", str(self.dir)],
            cwd=self.root,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=180,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        assert result.returncode == 0, f"fedcifar-deploy {args[0]} failed:\n{result.stdout}\n{result.stderr}"
        return result.stdout

    def up(self) -> None:
        data = [arg for path in self.data_paths for arg in ("--data-path", str(path))]
        self.deploy_cli(
            "up",
            "--nodes",
            str(NODES),
            *data,
            "--superlink-ports",
            ",".join(map(str, self.superlink_ports)),
            "--clientappio-base-port",
            str(self.clientappio_base_port),
        )

    def down(self) -> None:
        """`down`, then end by process group whatever this test started or restarted."""
        state = deploy.load_state(self.dir)
        for process in self.restarted.values():
            kill_group(process.pid)
            process.wait(timeout=10)
        self.restarted.clear()
        if state is not None:
            self.deploy_cli("down", "--stop-grace", "3")
            leftovers = deploy.stop_processes(state.processes, grace_s=3)
            assert not leftovers, f"still running after down: {leftovers}"

    def teardown(self) -> None:
        for run in self.runs:
            kill_group(run.process.pid)
        self.down()

    def record(self, name: str) -> deploy.ManagedProcess:
        state = deploy.load_state(self.dir)
        assert state is not None, "no deployment recorded"
        return next(p for p in state.processes if p.name == name)

    def alive(self, name: str) -> bool:
        if name in self.restarted:
            return self.restarted[name].poll() is None
        return bool(deploy.live_session_members(self.record(name)))

    def kill(self, name: str) -> None:
        """SIGKILL the process group of `name` (the process and every Flower child of it)."""
        pid = self.restarted.pop(name).pid if name in self.restarted else self.record(name).pid
        kill_group(pid)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            stat = deploy.read_proc_stat(pid)
            if stat is None or stat[0] == "Z":
                return
            time.sleep(0.1)
        pytest.fail(f"{name} (pid {pid}) survived SIGKILL")

    def restart_node(self, name: str) -> None:
        """Start SuperNode `name` again with the flags `up` gave it; wait until it is connected."""
        record = self.record(name)
        log = self.dir / "logs" / f"{name}-restarted.log"
        env = deploy.child_environment(self.dir / "flwr-home" / name)
        process = deploy.start_process(name, record.command, log, self.root, env)
        self.restarted[name] = process
        deadline = time.monotonic() + 60
        while not deploy.log_contains(log, deploy.SUPERNODE_CONNECTED_MARKER):
            assert process.poll() is None, f"{name} exited again:\n{log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"{name} did not reconnect:\n{log.read_text()[-2000:]}"
            time.sleep(0.1)

    def heal(self) -> None:
        """Bring back whatever an earlier test left dead, so tests do not depend on each other."""
        if not deploy.load_state(self.dir) or not self.alive("superlink"):
            self.down()
            self.up()
            return
        for index in range(NODES):
            if not self.alive(f"supernode-{index}"):
                self.restart_node(f"supernode-{index}")

    def node_id(self, name: str) -> int:
        """The node id SuperNode `name` printed when the SuperLink accepted it (its latest log)."""
        log = self.dir / "logs" / (f"{name}-restarted.log" if name in self.restarted else f"{name}.log")
        found = re.findall(r"SuperNode ID: (\d+)", ANSI.sub("", log.read_text()))
        assert found, f"no node id in {log}"
        return int(found[-1])

    # ---- the flwr CLI
    def federation_args(self) -> list[str]:
        return ["local-deployment", "--federation-config", f"address='127.0.0.1:{self.superlink_ports[2]}'"]

    def start_run(self, config: str, output_dir: Path) -> FlwrRun:
        run = FlwrRun(
            [deploy.flower_executable("flwr"), "run", ".", *self.federation_args(), "--stream", "--run-config", config],
            self.root / f"flwr-run-{len(self.runs)}.log",
            output_dir,
        )
        self.runs.append(run)
        return run

    def run(self, config: str, output_dir: Path) -> FlwrRun:
        run = self.start_run(config, output_dir)
        run.wait()
        return run

    def supernodes(self) -> list[dict]:
        """`flwr supernode list` as JSON, through the control project `up` wrote."""
        result = subprocess.run(
            [
                deploy.flower_executable("flwr"),
                "supernode",
                "list",
                str(self.dir / "control"),
                deploy.CONTROL_FEDERATION,
                "--format",
                "json",
            ],
            cwd=APP_DIR,
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
        )
        answer = json.loads(result.stdout[result.stdout.find("{") :])
        assert answer.get("success"), answer
        return answer["nodes"]


def start_federation(tmp_path_factory, name: str, data_paths=None) -> Federation:
    root = tmp_path_factory.mktemp(name)
    env = dict(os.environ, FEDCIFAR_CACHE_DIR=str(tmp_path_factory.getbasetemp() / "fedcifar-cache"))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return Federation(root, env, data_paths)


@pytest.fixture(scope="module")
def broken_data_federation(tmp_path_factory) -> Iterator[Federation]:
    """Three SuperNodes on their own parquet folders; supernode-2's train file is garbage bytes."""
    data = tmp_path_factory.mktemp("node-data")
    good = [make_parquet_dataset(data / f"good-{i}", n_train=60, n_test=20, seed=i) for i in range(2)]
    broken = make_parquet_dataset(data / "broken", n_train=20, n_test=10)
    (broken / "train-00000-of-00001.parquet").write_bytes(b"PAR1 these bytes are not a parquet file")
    federation = start_federation(tmp_path_factory, "broken-data", [*good, broken])
    try:
        federation.up()
        yield federation
    finally:
        federation.teardown()


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> Iterator[Federation]:
    """Three SuperNodes, partition-id=i num-partitions=3 of the run's dataset."""
    federation = start_federation(tmp_path_factory, "federation")
    try:
        federation.up()
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
    started again with the same flags, is accepted as a new node; the next test's first run
    needs all three nodes to train (min-train-nodes=3), so it is the new run that shows the
    restarted node works (it checks that node's log for its run)."""
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
    output = run.wait(timeout_s=ROUND_TIMEOUT_S + 60)
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


# --------------------------------------------------------------------------- item 4: server crash and resume
def test_superlink_crash_keeps_the_last_checkpoint_and_resume_finishes_the_run(federation, tmp_path):
    """SIGKILL the SuperLink's process group (SuperLink, SuperExec and the running
    flwr-serverapp) after round 2's checkpoint; restart the deployment; resume-from the
    run folder: the new folder holds rounds 0..4 once each.

    After the previous test, the first run is also the new run with the restarted SuperNode:
    with min-train-nodes=3 a round only counts if all three nodes trained."""
    federation.heal()
    nodes = "min-available-nodes=3 min-train-nodes=3 min-evaluate-nodes=1"
    first = federation.start_run(run_config(tmp_path / "first", 4, nodes), tmp_path / "first")

    def checkpoint_round() -> int:
        return int(torch.load(first.folder / "checkpoint.pt", map_location="cpu", weights_only=True)["round"])

    first.wait_for("round 2's checkpoint", lambda: checkpoint_round() >= 2)
    assert "Data check: 3 nodes ready" in first.output and not failure_lines(first.output), first.output
    if "supernode-2" in federation.restarted:  # the SuperNode that item 3 killed and started again
        run_id = re.search(r"started run (\d+)", first.output)[1]
        restarted_log = (federation.dir / "logs" / "supernode-2-restarted.log").read_text()
        assert f"[RUN {run_id}]" in restarted_log and "Receiving: train message" in restarted_log
    federation.kill("superlink")
    try:
        first.process.wait(timeout=30)  # the CLI loses its log stream
    except subprocess.TimeoutExpired:
        first.stop()

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
