"""End-to-end tests of a real local deployment: SuperLink, SuperNodes, `flwr run`.

Every test starts real Flower processes on 127.0.0.1 with `fedcifar-deploy up`
(on free ports, in a tmp folder; tests/support/deployment.py), runs the app with
the `flwr` CLI, judges the run by what it wrote (status, metrics), and always ends
every process it started by pid in a fixture finalizer. Nothing is mocked.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.datasets import make_parquet_dataset
from support.deployment import LocalDeployment
from support.flwr_run import flwr_environment

from fedcifar_app.deploy.certificates import ensure_node_key
from fedcifar_app.deploy.commands import SUPERNODE_CONNECTED_MARKER, supernode_command

pytestmark = pytest.mark.slow  # real processes: minutes on two cores

# Rounds 0..2 on the insecure federation. The TLS and data-path tests prove a
# different point (the federation works at all), so one round each.
FULL_RUN_ROUNDS = 2
SHORT_RUN_ROUNDS = 1


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[LocalDeployment]:
    """Two SuperNodes' worth of ports; every process is ended, whatever the test did."""
    federation = LocalDeployment(tmp_path, flwr_environment(tmp_path / "cache"), nodes=2)
    try:
        yield federation
    finally:
        federation.teardown()


def run_config(output_dir: Path, rounds: int) -> str:
    """A small, fast run on two nodes; ONE string, as `flwr run` needs."""
    return (
        f"num-server-rounds={rounds} min-train-nodes=2 min-evaluate-nodes=1 "
        f"min-available-nodes=2 dataset='synthetic' output-dir='{output_dir}' "
        "node-wait-timeout=60 round-timeout=120"
    )


def assert_completed_run(federation: LocalDeployment, rounds: int) -> None:
    """The one run finished:completed and wrote metrics for rounds 0..rounds."""
    (run,) = federation.runs
    assert run.process.returncode == 0, run.output[-4000:]
    listed = federation.listed_runs()
    assert len(listed) == 1 and listed[0]["status"] == "finished:completed", listed
    assert run.status["status"] == "completed", run.status
    assert [entry["round"] for entry in run.metrics] == list(range(rounds + 1)), run.metrics
    assert all("central-accuracy" in entry for entry in run.metrics), run.metrics


def assert_every_clientapp_started_warm(federation: LocalDeployment) -> None:
    """No SuperNode fell back to a cold start, and the warm parent refused nothing."""
    for index in range(federation.nodes):
        log = federation.node_log(f"supernode-{index}").read_text()
        assert "warm ClientApp start unavailable" not in log, log[-3000:]
    assert "refused a ClientApp start" not in federation.warm_parent_log.read_text()


def wait_for_exit(process: subprocess.Popen, timeout_s: float) -> int:
    """Exit code of `process`, failing the test if it is still running at the bound."""
    try:
        return process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pytest.fail(f"pid {process.pid} still running after {timeout_s} s")


def test_insecure_deployment_completes_a_run(deployment: LocalDeployment, tmp_path: Path) -> None:
    """SuperLink + 2 SuperNodes without TLS: a 2-round run completes and is recorded."""
    printed = deployment.up()
    assert "supernode-1" in printed and "flwr run ." in printed
    assert "other machines" not in printed  # loopback only: nothing to tell other machines

    status = deployment.deploy_cli("status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert status.stdout.count("running") == 4, status.stdout  # SuperLink, 2 SuperNodes, their warm parent
    assert "ClientApps: warm start" in status.stdout, status.stdout

    # Each SuperNode's ClientApps get their share of the cores (torch reads OMP_NUM_THREADS).
    share = str(max(1, len(os.sched_getaffinity(0)) // 2))
    for name in ("supernode-0", "supernode-1"):
        environ = Path(f"/proc/{deployment.record(name).pid}/environ").read_bytes().split(b"\0")
        assert f"OMP_NUM_THREADS={share}".encode() in environ, name

    assert len(deployment.supernodes()) == 2
    deployment.run(run_config(tmp_path / "outputs", FULL_RUN_ROUNDS), tmp_path / "outputs")
    assert_completed_run(deployment, FULL_RUN_ROUNDS)
    assert_every_clientapp_started_warm(deployment)


def test_tls_and_authentication(deployment: LocalDeployment, tmp_path: Path) -> None:
    """With TLS + SuperNode auth a run completes; an unregistered key and a node
    without the CA are refused and never take part."""
    deployment.up("--tls", "--auth")
    registered = {node["node-id"] for node in deployment.supernodes()}
    assert len(registered) == 2

    # A well-formed P-384 key that was never registered with the SuperLink.
    intruder_key, _ = ensure_node_key(tmp_path / "intruder-keys", "intruder")
    intruder = deployment.start_extra_supernode(
        "intruder",
        supernode_command(
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
        supernode_command(
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
    assert SUPERNODE_CONNECTED_MARKER not in intruder_log
    assert "CERTIFICATE_VERIFY_FAILED" in no_ca_log, no_ca_log
    assert SUPERNODE_CONNECTED_MARKER not in no_ca_log

    deployment.run(run_config(tmp_path / "outputs", SHORT_RUN_ROUNDS), tmp_path / "outputs")
    assert_completed_run(deployment, SHORT_RUN_ROUNDS)
    assert_every_clientapp_started_warm(deployment)  # TLS and auth change nothing for the ClientApp's start
    # Only the two registered nodes ever existed on the SuperLink.
    assert {node["node-id"] for node in deployment.supernodes()} == registered
    for name in ("intruder", "no-ca"):
        assert "[RUN " not in (deployment.dir / "logs" / f"{name}.log").read_text()
    superlink_log = (deployment.dir / "logs" / "superlink.log").read_text()
    assert "Activation failed: No SuperNode found with the given public key" in superlink_log


def test_data_path_nodes_complete_a_run(deployment: LocalDeployment, tmp_path: Path) -> None:
    """Two SuperNodes, each with its own parquet folder (node config data-path); the one deployment
    test with Flower's own cold ClientApp start (--cold).

    Their node config holds only data-path, no partition-id, so a completed run
    means both ClientApps read their own folders.
    """
    folders = [make_parquet_dataset(tmp_path / f"node-data-{i}", n_train=60, n_test=20, seed=i) for i in range(2)]
    printed = deployment.up("--cold", "--data-path", str(folders[0]), "--data-path", str(folders[1]))
    assert f"data-path='{folders[0]}'" in printed and "ClientApps: cold start" in printed
    assert not (deployment.dir / "warm").exists() and not deployment.warm_parent_log.exists()

    deployment.run(run_config(tmp_path / "outputs", SHORT_RUN_ROUNDS), tmp_path / "outputs")
    assert_completed_run(deployment, SHORT_RUN_ROUNDS)
