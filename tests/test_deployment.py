"""End-to-end tests of a real local deployment: SuperLink, SuperNodes, `flwr run`.

Every test starts real Flower processes on 127.0.0.1 with `fedcifar-deploy up`
(on free ports, in a tmp folder), runs the app with the `flwr` CLI, judges the run
by what it wrote (status, metrics), and always ends every process it started by
pid in a fixture finalizer. Nothing is mocked. Each wait is bounded.
"""

from __future__ import annotations

import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedcifar_app import deploy

APP_DIR = Path(__file__).resolve().parents[1]
DEPLOY_TIMEOUT_S = 120
RUN_TIMEOUT_S = 240
CLI_TIMEOUT_S = 60
# Issue 4 asks for rounds 0..2 on the insecure federation. The TLS and data-path
# tests prove a different point (the federation works at all), so one round
# each keeps the three tests under five minutes on two cores.
FULL_RUN_ROUNDS = 2
SHORT_RUN_ROUNDS = 1


# --------------------------------------------------------------------------- helpers
def free_port_block(count: int) -> list[int]:
    """`count` consecutive ports that are free on 127.0.0.1 right now."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 60000 - count)
        ports = list(range(base, base + count))
        try:
            for port in ports:
                with socket.socket() as probe:
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        return ports
    raise RuntimeError(f"no block of {count} free ports found")


def flwr_executable() -> str:
    """The `flwr` CLI of the interpreter running the tests."""
    return deploy.flower_executable("flwr")


def run_deploy_cli(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`python -m fedcifar_app.deploy ARGS`, bounded."""
    return subprocess.run(
        [sys.executable, "-m", "fedcifar_app.deploy", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=DEPLOY_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def run_bounded(command: list[str], cwd: Path, timeout_s: float, log_path: Path) -> tuple[int, str]:
    """Run a command in its own session; on timeout end its whole process group.

    `flwr run` ended alone would leave children behind, so the group goes.
    Output goes to a file (not a pipe) so a stray child can never block the read.
    """
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            code = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            pytest.fail(f"{' '.join(command[:3])} timed out after {timeout_s} s; log {log_path}")
    return code, log_path.read_text(encoding="utf-8", errors="replace")


def cli_json(command: list[str], cwd: Path, log_path: Path) -> dict:
    """Run a `flwr ... --format json` command and return its JSON answer."""
    _, output = run_bounded(command, cwd, CLI_TIMEOUT_S, log_path)
    start = output.find("{")
    assert start >= 0, f"no JSON from {' '.join(command)}:\n{output}"
    return json.loads(output[start:])


def wait_for_exit(process: subprocess.Popen, timeout_s: float) -> int:
    """Exit code of `process`, failing the test if it is still running at the bound."""
    try:
        return process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pytest.fail(f"pid {process.pid} still running after {timeout_s} s")


class Deployment:
    """A deployment started by `fedcifar-deploy up` in a tmp folder, for one test."""

    def __init__(self, root: Path, env: dict[str, str]):
        self.root = root
        self.env = env
        self.dir = root / "deploy"
        ports = free_port_block(8)
        self.serverappio_port, self.fleet_port, self.control_port = ports[:3]
        self.clientappio_base_port = ports[3]
        self.spare_ports = ports[6:]  # for SuperNodes the test starts by hand
        self.extra_processes: list[deploy.ManagedProcess] = []
        self.tls = False

    @property
    def fleet_address(self) -> str:
        return f"127.0.0.1:{self.fleet_port}"

    @property
    def ca_certificate(self) -> Path:
        return self.dir / "certs" / "ca.crt"

    def up(self, *extra: str) -> str:
        """Start the federation; returns what `up` printed."""
        self.tls = "--tls" in extra
        result = run_deploy_cli(
            [
                "up",
                "--dir",
                str(self.dir),
                "--superlink-ports",
                f"{self.serverappio_port},{self.fleet_port},{self.control_port}",
                "--clientappio-base-port",
                str(self.clientappio_base_port),
                *extra,
            ],
            cwd=self.root,
            env=self.env,
        )
        assert result.returncode == 0, f"up failed:\n{result.stdout}\n{result.stderr}"
        return result.stdout

    def start_extra_supernode(self, name: str, command: list[str]) -> subprocess.Popen:
        """A SuperNode outside `up` (to show it is refused); ended in teardown."""
        process = deploy.start_process(
            name,
            command,
            self.dir / "logs" / f"{name}.log",
            self.root,
            deploy.child_environment(self.dir / "flwr-home" / name)
            | {"FEDCIFAR_CACHE_DIR": self.env["FEDCIFAR_CACHE_DIR"]},
        )
        self.extra_processes.append(
            deploy.ManagedProcess(
                name=name,
                pid=process.pid,
                start_ticks=deploy.process_start_ticks(process.pid),
                log=str(self.dir / "logs" / f"{name}.log"),
                command=command,
            )
        )
        return process

    def federation(self) -> tuple[str, list[str]]:
        """The app's federation for this deployment, and the overrides that point
        it at this SuperLink's port (and CA, with TLS)."""
        overrides = f"address='127.0.0.1:{self.control_port}'"
        if not self.tls:
            return "local-deployment", ["--federation-config", overrides]
        overrides += f" root-certificates='{self.ca_certificate}'"
        return "local-deployment-tls", ["--federation-config", overrides]

    def flwr_run(self, run_config: str) -> str:
        """`flwr run . <federation> --stream`; returns its output."""
        name, overrides = self.federation()
        code, output = run_bounded(
            [flwr_executable(), "run", ".", name, "--stream", "--run-config", run_config, *overrides],
            APP_DIR,
            RUN_TIMEOUT_S,
            self.root / "flwr-run.log",
        )
        assert code == 0, f"flwr run exited {code}:\n{output[-4000:]}"
        return output

    def runs(self) -> list[dict]:
        """`flwr ls` as JSON: the runs this SuperLink knows."""
        answer = cli_json(
            [flwr_executable(), "ls", ".", self.federation()[0], *self.federation()[1], "--format", "json"],
            APP_DIR,
            self.root / "flwr-ls.log",
        )
        assert answer.get("success"), answer
        return answer["runs"]

    def supernodes(self) -> list[dict]:
        """`flwr supernode list` as JSON, through the control project `up` wrote."""
        answer = cli_json(
            [
                flwr_executable(),
                "supernode",
                "list",
                str(self.dir / "control"),
                deploy.CONTROL_FEDERATION,
                "--format",
                "json",
            ],
            APP_DIR,
            self.root / "flwr-supernode-list.log",
        )
        assert answer.get("success"), answer
        return answer["nodes"]

    def teardown(self) -> None:
        """`down`, then make sure by pid that nothing we started is left."""
        state = deploy.load_state(self.dir)
        recorded = state.processes if state else []
        deploy.stop_processes(self.extra_processes, grace_s=5)
        result = run_deploy_cli(["down", "--dir", str(self.dir)], cwd=self.root, env=self.env)
        leftovers = deploy.stop_processes(recorded + self.extra_processes, grace_s=5)
        assert result.returncode == 0, f"down failed:\n{result.stdout}\n{result.stderr}"
        assert not leftovers, f"still running after down: {leftovers}"
        assert not deploy.state_path(self.dir).exists(), "down left the pid state behind"
        assert (self.dir / "logs" / "superlink.log").is_file(), "down removed the logs"


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    """A Deployment whose processes are always ended, whatever the test did."""
    env = dict(os.environ, FEDCIFAR_CACHE_DIR=str(tmp_path / "cache"))
    federation = Deployment(tmp_path, env)
    try:
        yield federation
    finally:
        federation.teardown()


def run_config(output_dir: Path, rounds: int, extra: str = "") -> str:
    """A small, fast run on two nodes; ONE string, as `flwr run` needs."""
    return (
        f"num-server-rounds={rounds} min-train-nodes=2 min-evaluate-nodes=1 "
        f"min-available-nodes=2 dataset='synthetic' output-dir='{output_dir}' "
        f"node-wait-timeout=60 round-timeout=120 {extra}"
    ).strip()


def assert_completed_run(federation: Deployment, output_dir: Path, rounds: int) -> dict:
    """The one run finished:completed and wrote metrics for rounds 0..rounds."""
    runs = federation.runs()
    assert len(runs) == 1, runs
    assert runs[0]["status"] == "finished:completed", runs[0]
    run_folders = [
        path
        for path in output_dir.iterdir()
        if path.is_dir() and not path.is_symlink() and (path / "status.json").is_file()
    ]
    assert len(run_folders) == 1, run_folders
    status = json.loads((run_folders[0] / "status.json").read_text())
    assert status["status"] == "completed", status
    metrics = json.loads((run_folders[0] / "metrics.json").read_text())
    assert [entry["round"] for entry in metrics] == list(range(rounds + 1)), metrics
    assert all("central-accuracy" in entry for entry in metrics), metrics
    return {"run": runs[0], "folder": run_folders[0], "metrics": metrics}


# --------------------------------------------------------------------------- tests
def test_insecure_deployment_completes_a_run(deployment: Deployment, tmp_path: Path) -> None:
    """SuperLink + 2 SuperNodes without TLS: a 2-round run completes and is recorded."""
    printed = deployment.up("--nodes", "2")
    assert "supernode-1" in printed and "flwr run ." in printed

    status = run_deploy_cli(["status", "--dir", str(deployment.dir)], deployment.root, deployment.env)
    assert status.returncode == 0, status.stdout + status.stderr
    assert status.stdout.count("running") == 3, status.stdout

    assert len(deployment.supernodes()) == 2
    deployment.flwr_run(run_config(tmp_path / "outputs", FULL_RUN_ROUNDS))
    assert_completed_run(deployment, tmp_path / "outputs", FULL_RUN_ROUNDS)


def test_tls_and_authentication(deployment: Deployment, tmp_path: Path) -> None:
    """With TLS + SuperNode auth a run completes; an unregistered key and a node
    without the CA are refused and never take part."""
    deployment.up("--nodes", "2", "--tls", "--auth")
    registered = {node["node-id"] for node in deployment.supernodes()}
    assert len(registered) == 2

    # A well-formed P-384 key that was never registered with the SuperLink.
    intruder_key, _ = deploy.ensure_node_key(tmp_path / "intruder-keys", "intruder")
    intruder = deployment.start_extra_supernode(
        "intruder",
        deploy.supernode_command(
            deployment.fleet_address,
            f"127.0.0.1:{deployment.spare_ports[0]}",
            "partition-id=0 num-partitions=2",
            deployment.ca_certificate,
            intruder_key,
            max_retries=0,
        ),
    )
    # TLS on (not --insecure), but no --root-certificates: the system trust store
    # does not know our CA, so the handshake fails.
    no_ca = deployment.start_extra_supernode(
        "no-ca",
        deploy.supernode_command(
            deployment.fleet_address,
            f"127.0.0.1:{deployment.spare_ports[1]}",
            "partition-id=1 num-partitions=2",
            None,
            None,
            max_retries=0,
            insecure=False,
        ),
    )
    assert wait_for_exit(intruder, 60) != 0
    assert wait_for_exit(no_ca, 60) != 0
    intruder_log = (deployment.dir / "logs" / "intruder.log").read_text()
    no_ca_log = (deployment.dir / "logs" / "no-ca.log").read_text()
    assert "No SuperNode found with the given public key" in intruder_log, intruder_log
    assert deploy.SUPERNODE_CONNECTED_MARKER not in intruder_log
    assert "CERTIFICATE_VERIFY_FAILED" in no_ca_log, no_ca_log
    assert deploy.SUPERNODE_CONNECTED_MARKER not in no_ca_log

    deployment.flwr_run(run_config(tmp_path / "outputs", SHORT_RUN_ROUNDS))
    assert_completed_run(deployment, tmp_path / "outputs", SHORT_RUN_ROUNDS)
    # Only the two registered nodes ever existed on the SuperLink.
    assert {node["node-id"] for node in deployment.supernodes()} == registered
    for name in ("intruder", "no-ca"):
        assert "[RUN " not in (deployment.dir / "logs" / f"{name}.log").read_text()
    superlink_log = (deployment.dir / "logs" / "superlink.log").read_text()
    assert "Activation failed: No SuperNode found with the given public key" in superlink_log


def write_parquet_folder(folder: Path, num_train: int, num_test: int, seed: int) -> None:
    """A tiny CIFAR-shaped dataset: JPEG 32x32 RGB in `img` {bytes, path}, `label` 0..9."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for split, count in (("train", num_train), ("test", num_test)):
        images, labels = [], []
        for index in range(count):
            label = index % 10
            pixels = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
            pixels[..., label % 3] = 25 * label  # a label-dependent channel to learn
            buffer = io.BytesIO()
            Image.fromarray(pixels, "RGB").save(buffer, format="JPEG")
            images.append({"bytes": buffer.getvalue(), "path": f"{split}-{index}.jpg"})
            labels.append(label)
        table = pa.table({"img": images, "label": pa.array(labels, pa.int64())})
        pq.write_table(table, folder / f"{split}-00000-of-00001.parquet")


def test_data_path_nodes_complete_a_run(deployment: Deployment, tmp_path: Path) -> None:
    """Two SuperNodes, each with its own parquet folder (node config data-path).

    Their node config holds only data-path, no partition-id, so a completed run
    means both ClientApps read their own folders.
    """
    folders = [tmp_path / "node-data-0", tmp_path / "node-data-1"]
    for seed, folder in enumerate(folders):
        write_parquet_folder(folder, num_train=60, num_test=20, seed=seed)

    printed = deployment.up("--nodes", "2", "--data-path", str(folders[0]), "--data-path", str(folders[1]))
    assert f"data-path='{folders[0]}'" in printed

    deployment.flwr_run(run_config(tmp_path / "outputs", SHORT_RUN_ROUNDS))
    assert_completed_run(deployment, tmp_path / "outputs", SHORT_RUN_ROUNDS)
