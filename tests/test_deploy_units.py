"""Unit tests of fedcifar_app.deploy's pieces: no Flower process, each test well under a second."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import tomli
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from support.flwr_run import PROJECT

from fedcifar_app.deploy import cli
from fedcifar_app.deploy.certificates import (
    certificate_covers,
    certificate_names,
    ensure_node_key,
    ensure_tls_files,
)
from fedcifar_app.deploy.commands import (
    SuperLinkPorts,
    clientappio_flags,
    data_path_node_config,
    installed_flwr_version,
    node_configs,
    superlink_command,
    supernode_command,
    supernode_thread_environment,
    warm_parent_command,
)
from fedcifar_app.deploy.flwr_cli import CONTROL_FEDERATION, write_control_project
from fedcifar_app.deploy.orchestration import (
    LOCAL_FEDERATION_ADDRESS,
    UpOptions,
    bring_down,
    describe,
    other_machines_hint,
    suggested_run_command,
)
from fedcifar_app.deploy.processes import (
    ReadinessCheck,
    check_ports_free,
    live_session_members,
    log_hint,
    split_address,
    start_process,
    stop_processes,
    wait_until_ready,
)
from fedcifar_app.deploy.state import (
    COLD,
    WARM,
    WARM_PARENT_NAME,
    DeploymentState,
    ManagedProcess,
    load_state,
    save_state,
    state_path,
)
from fedcifar_app.errors import DeployError
from fedcifar_app.procfs import parse_proc_stat, process_start
from fedcifar_app.pyproject import read_pyproject

PORTS = SuperLinkPorts(9091, 9092, 9093)


# --------------------------------------------------------------------------- command lines
def test_superlink_ports_parse_and_refuse() -> None:
    assert SuperLinkPorts.parse("19091, 19092,19093") == SuperLinkPorts(19091, 19092, 19093)
    for bad in ("9091,9092", "9091,9091,9093", "a,b,c", "9091,9092,70000"):
        with pytest.raises(ValueError, match="ports"):
            SuperLinkPorts.parse(bad)


def test_superlink_command_keeps_serverappio_on_loopback() -> None:
    insecure = superlink_command(PORTS, "0.0.0.0", None, enable_auth=False)
    assert insecure[insecure.index("--serverappio-api-address") + 1] == "127.0.0.1:9091"
    assert insecure[insecure.index("--fleet-api-address") + 1] == "0.0.0.0:9092"
    assert insecure[insecure.index("--control-api-address") + 1] == "0.0.0.0:9093"
    assert "--insecure" in insecure and "--enable-supernode-auth" not in insecure


def test_superlink_command_with_tls_and_auth(tmp_path: Path) -> None:
    tls = ensure_tls_files(tmp_path / "certs", ["localhost", "127.0.0.1"])
    command = superlink_command(PORTS, "127.0.0.1", tls, enable_auth=True)
    assert "--insecure" not in command and "--enable-supernode-auth" in command
    assert command[command.index("--ssl-ca-certfile") + 1] == str(tls.ca_certificate)
    assert command[command.index("--ssl-keyfile") + 1] == str(tls.server_key)
    assert str(tls.ca_key) not in command  # the CA's key never leaves the certs folder


def test_supernode_command_variants() -> None:
    plain = supernode_command("10.0.0.1:9092", "127.0.0.1:9094", "partition-id=0 num-partitions=2", None)
    assert plain[1:5] == ["--superlink", "10.0.0.1:9092", "--clientappio-api-address", "127.0.0.1:9094"]
    assert "--insecure" in plain and plain[-2:] == ["--node-config", "partition-id=0 num-partitions=2"]
    secure = supernode_command("h:1", "127.0.0.1:2", "", Path("/ca.crt"), Path("/key"), max_retries=0, max_wait_s=None)
    assert "--insecure" not in secure and "--node-config" not in secure and "--max-wait-time" not in secure
    assert secure[secure.index("--root-certificates") + 1] == "/ca.crt"
    assert secure[secure.index("--auth-supernode-private-key") + 1] == "/key"
    assert secure[secure.index("--max-retries") + 1] == "0"
    no_ca = supernode_command("h:1", "127.0.0.1:2", "", None, insecure=False)
    assert "--insecure" not in no_ca and "--root-certificates" not in no_ca


def test_supernode_command_follows_the_installed_flower() -> None:
    """flwr 1.35 replaced --clientappio-api-address by the Runtime API's --host/--port (and refuses the old flag)."""
    assert clientappio_flags("127.0.0.1:9094", (1, 25, 0)) == ["--clientappio-api-address", "127.0.0.1:9094"]
    assert clientappio_flags("127.0.0.1:9094", (1, 34, 9)) == ["--clientappio-api-address", "127.0.0.1:9094"]
    assert clientappio_flags("127.0.0.1:9094", (1, 35, 0)) == ["--host", "127.0.0.1", "--port", "9094"]
    assert clientappio_flags("[::1]:9094", (1, 42, 0)) == ["--host", "::1", "--port", "9094"]
    newest = supernode_command("h:1", "127.0.0.1:2", "", None, flwr_version=(1, 42, 0))
    assert newest[3:7] == ["--host", "127.0.0.1", "--port", "2"] and "--clientappio-api-address" not in newest
    assert installed_flwr_version()[:2] == (1, 25)  # the pinned Flower: the default command is 1.25's


def test_warm_parent_command_names_every_supernode(tmp_path: Path) -> None:
    command = warm_parent_command(tmp_path / "warm", [11, 12])
    assert Path(command[0]).name == "fedcifar-warm"
    assert command[1:] == ["--dir", str(tmp_path / "warm"), "--exit-with", "11", "--exit-with", "12"]


def test_node_configs_default_explicit_and_data_paths(tmp_path: Path) -> None:
    assert node_configs(2, None, None) == ["partition-id=0 num-partitions=2", "partition-id=1 num-partitions=2"]
    assert node_configs(1, [" torch-threads=1 "], None) == ["torch-threads=1"]
    folders = [tmp_path / "a", tmp_path / "b"]
    for folder in folders:
        folder.mkdir()
    assert node_configs(2, None, [str(f) for f in folders]) == [f"data-path='{f}'" for f in folders]
    assert node_configs(1, ["x=1"], [str(folders[0])]) == [f"x=1 data-path='{folders[0]}'"]
    with pytest.raises(DeployError, match=r"--data-path given 1x for --nodes 2"):
        node_configs(2, None, [str(folders[0])])
    with pytest.raises(DeployError, match="is not a folder"):
        node_configs(1, None, [str(tmp_path / "missing")])


def test_data_path_quoting(tmp_path: Path) -> None:
    quoted = tmp_path / "it's"
    assert data_path_node_config(quoted) == f'data-path="{quoted}"'
    with pytest.raises(DeployError, match="both quote kinds"):
        data_path_node_config(tmp_path / 'it\'s "odd"')


def test_thread_environment_gives_each_clientapp_its_share() -> None:
    assert supernode_thread_environment(2, 10) == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    assert supernode_thread_environment(8, 2)["OMP_NUM_THREADS"] == "4"
    assert supernode_thread_environment(8, 0)["OMP_NUM_THREADS"] == "8"


# --------------------------------------------------------------------------- certificates and keys
def test_certificate_names() -> None:
    assert certificate_names("0.0.0.0", ["superlink.example.org", "localhost"]) == [
        "localhost",
        "127.0.0.1",
        "superlink.example.org",
    ]
    assert certificate_names("10.201.0.1", ["10.201.0.1"]) == ["localhost", "127.0.0.1", "10.201.0.1"]


def _signed_by(certificate: Path, ca: Path) -> bool:
    cert = x509.load_pem_x509_certificate(certificate.read_bytes())
    ca_cert = x509.load_pem_x509_certificate(ca.read_bytes())
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def test_another_name_keeps_the_ca(tmp_path: Path) -> None:
    """A second `up --tls-san NAME` re-issues the server certificate from the SAME CA."""
    first = ensure_tls_files(tmp_path, ["localhost", "127.0.0.1"])
    ca_bytes, server_bytes = first.ca_certificate.read_bytes(), first.server_certificate.read_bytes()
    assert certificate_covers(first.server_certificate, ["localhost", "127.0.0.1"])
    assert not certificate_covers(first.server_certificate, ["10.201.0.1"])
    for secret in (first.ca_key, first.server_key):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600

    ensure_tls_files(tmp_path, ["localhost", "127.0.0.1"])
    assert first.server_certificate.read_bytes() == server_bytes  # covered: nothing rewritten

    second = ensure_tls_files(tmp_path, ["localhost", "127.0.0.1", "10.201.0.1", "superlink.example.org"])
    assert second.ca_certificate.read_bytes() == ca_bytes
    assert second.server_certificate.read_bytes() != server_bytes
    assert certificate_covers(second.server_certificate, ["10.201.0.1", "superlink.example.org", "localhost"])
    assert _signed_by(second.server_certificate, second.ca_certificate)


def test_a_missing_name_without_the_ca_key_is_refused(tmp_path: Path) -> None:
    """Certificates from before the CA key was kept: say how to make a new CA, never make one silently."""
    files = ensure_tls_files(tmp_path, ["localhost", "127.0.0.1"])
    files.ca_key.unlink()
    ca_bytes = files.ca_certificate.read_bytes()
    with pytest.raises(DeployError, match=r"does not name all of .*10\.201\.0\.1.*remove .* to make a new CA"):
        ensure_tls_files(tmp_path, ["localhost", "127.0.0.1", "10.201.0.1"])
    assert files.ca_certificate.read_bytes() == ca_bytes


def test_node_key_is_openssh_p384_and_kept(tmp_path: Path) -> None:
    private, public = ensure_node_key(tmp_path, "node-a")
    key = serialization.load_ssh_private_key(private.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ") and public.read_text().strip().endswith("node-a")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    first_bytes = private.read_bytes()
    assert ensure_node_key(tmp_path, "node-a") == (private, public) and private.read_bytes() == first_bytes


# --------------------------------------------------------------------------- state file
def _state(directory: Path, **extra) -> DeploymentState:
    fields = {
        "started_at": "2026-01-01T00:00:00",
        "working_directory": "/work",
        "tls": False,
        "auth": False,
        "fleet_address": "127.0.0.1:9092",
        "control_address": "127.0.0.1:9093",
        "serverappio_address": "127.0.0.1:9091",
    }
    return DeploymentState(directory=str(directory), **{**fields, **extra})


def test_state_round_trip_is_atomic(tmp_path: Path) -> None:
    state = _state(tmp_path, processes=[ManagedProcess("superlink", 123, 456, "log", ["a", "b"], "addr")])
    save_state(state)
    assert load_state(tmp_path) == state
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary file left
    assert load_state(tmp_path / "nothing-here") is None


def test_state_from_an_older_version_and_a_damaged_one(tmp_path: Path) -> None:
    old = '{"directory": "d", "started_at": "s", "working_directory": "w", "tls": false, "auth": false,'
    old += ' "fleet_address": "127.0.0.1:9092", "control_address": "c", "serverappio_address": "x", "processes": []}'
    assert DeploymentState.from_json(old).listen_host == "127.0.0.1"
    assert DeploymentState.from_json(old).clientapp_start == COLD  # started before the warm start existed
    state_path(tmp_path).write_text('{"directory": ')
    with pytest.raises(DeployError, match=r"cannot read .*state.json .*stop its processes by hand"):
        load_state(tmp_path)


# --------------------------------------------------------------------------- options and CLI
def test_up_options_refuse_bad_combinations() -> None:
    with pytest.raises(DeployError, match="--auth needs --tls"):
        UpOptions(auth=True)
    with pytest.raises(DeployError, match="--nodes -1"):
        UpOptions(nodes=-1)
    with pytest.raises(DeployError, match=r"ClientAppIo ports \[9092, 9093\] collide"):
        UpOptions(nodes=3, clientappio_base_port=9092)
    with pytest.raises(DeployError, match="choose a lower base port"):
        UpOptions(nodes=10, clientappio_base_port=65530)
    with pytest.raises(DeployError, match="--clientapp-threads 0"):
        UpOptions(clientapp_threads=0)


def test_up_options_addresses() -> None:
    everywhere = UpOptions(host="0.0.0.0", tls=True, tls_sans=("localhost", "10.201.0.1"))
    assert (everywhere.local_host, everywhere.public_host) == ("127.0.0.1", "10.201.0.1")
    assert UpOptions(host="10.201.0.1").public_host == "10.201.0.1"
    assert UpOptions().public_host == "" and UpOptions(nodes=3).clientappio_ports == [9094, 9095, 9096]


def test_cli_builds_options_from_every_flag() -> None:
    args = cli.build_parser().parse_args(
        "up --dir d --nodes 3 --tls --auth --superlink-ports 1,2,3 --clientappio-base-port 10 --host 0.0.0.0 "
        "--tls-san a.example --tls-san 10.0.0.1 --node-config x=1 --node-config x=2 --node-config x=3 "
        "--ready-timeout 5 --stop-grace 2 --supernode-max-retries 0 --supernode-max-wait-time 9 "
        "--clientapp-threads 1".split()
    )
    assert cli.up_options(args) == UpOptions(
        directory=Path("d"),
        nodes=3,
        tls=True,
        auth=True,
        superlink_ports=SuperLinkPorts(1, 2, 3),
        clientappio_base_port=10,
        node_configs=("x=1", "x=2", "x=3"),
        host="0.0.0.0",
        tls_sans=("a.example", "10.0.0.1"),
        ready_timeout_s=5,
        stop_grace_s=2,
        supernode_max_retries=0,
        supernode_max_wait_s=9,
        clientapp_threads=1,
    )
    assert cli.up_options(cli.build_parser().parse_args(["up"])).warm
    assert not cli.up_options(cli.build_parser().parse_args(["up", "--cold"])).warm
    supernode = cli.build_parser().parse_args("supernode --superlink h:1 --node-config x=1 --cold".split())
    assert supernode.cold


def test_status_says_how_clientapps_start(tmp_path: Path) -> None:
    """`status` names the mode; a warm deployment whose parent died says its ClientApps now start cold."""
    leader = start_process("warm", ["sleep", "30"], tmp_path / "sleep.log", tmp_path, dict(os.environ))
    try:
        node = ManagedProcess("supernode-0", leader.pid, process_start(leader.pid), "log", ["x"])
        assert "ClientApps: cold start" in describe(_state(tmp_path, processes=[node]))
        parent = ManagedProcess(WARM_PARENT_NAME, leader.pid, process_start(leader.pid), "log", ["x"])
        warm = _state(tmp_path, processes=[node, parent], clientapp_start=WARM, warm_folder=str(tmp_path / "w"))
        assert f"ClientApps: warm start (forked from {WARM_PARENT_NAME} pid {leader.pid}" in describe(warm)
    finally:
        leader.kill()
        leader.wait()
    assert "ClientApps: cold, each with a warning: the warm parent" in describe(warm)


def test_cli_failures_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["up", "--auth", "--dir", str(tmp_path)]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("fedcifar-deploy: --auth needs --tls"), error
    with pytest.raises(SystemExit):
        cli.main(["up", "--superlink-ports", "1,2"])
    assert "expected three ports" in capsys.readouterr().err
    assert cli.main(["status", "--dir", str(tmp_path)]) == 1
    assert bring_down(tmp_path, 1.0).startswith("nothing to stop")


def test_run_command_and_other_machines_hint(tmp_path: Path) -> None:
    local = _state(tmp_path)
    assert suggested_run_command(local, tmp_path) == "flwr run . local-deployment --stream"
    assert other_machines_hint(local) == ""
    moved = _state(tmp_path, tls=True, ca_certificate="/elsewhere/ca.crt")
    moved.control_address = "127.0.0.1:19093"
    assert suggested_run_command(moved, tmp_path) == (
        "flwr run . local-deployment-tls --stream "
        "--federation-config \"address='127.0.0.1:19093' root-certificates='/elsewhere/ca.crt'\""
    )
    public = _state(
        tmp_path,
        listen_host="0.0.0.0",
        tls=True,
        ca_certificate="/d/certs/ca.crt",
        public_fleet_address="10.201.0.1:9092",
        public_control_address="10.201.0.1:9093",
    )
    hint = other_machines_hint(public)
    assert "flower-supernode --superlink 10.201.0.1:9092" in hint and "'10.201.0.1:9093'" in hint
    assert "/d/certs/ca.crt" in hint and hint in describe(public)
    assert "this machine's address" in other_machines_hint(_state(tmp_path, listen_host="0.0.0.0"))


def test_the_local_federations_point_where_up_listens_by_default() -> None:
    federations = read_pyproject(PROJECT)["tool"]["flwr"]["federations"]
    for name in ("local-deployment", "local-deployment-tls"):
        assert federations[name]["address"] == LOCAL_FEDERATION_ADDRESS, name


def test_control_project_names_this_superlink(tmp_path: Path) -> None:
    project = write_control_project(tmp_path / "control", "10.201.0.1:9093", tmp_path / "ca.crt")
    settings = tomli.loads((project / "pyproject.toml").read_text())["tool"]["flwr"]["federations"]
    assert settings["default"] == CONTROL_FEDERATION
    assert settings[CONTROL_FEDERATION] == {
        "address": "10.201.0.1:9093",
        "root-certificates": str((tmp_path / "ca.crt").resolve()),
    }


# --------------------------------------------------------------------------- processes
def test_parse_proc_stat_survives_odd_command_names() -> None:
    fields = " ".join(["S", "1", "77", "88"] + ["0"] * 13 + ["3", "0", "4242", "0"])
    parsed = parse_proc_stat(f"123 (a) b (c)) {fields}")
    assert parsed == ("S", 1, 77, 88, 3, 4242) and parsed.session == 88 and parsed.parent == 1
    assert parsed.threads == 3 and parsed.start_ticks == 4242


def test_split_address() -> None:
    assert split_address("127.0.0.1:9092") == ("127.0.0.1", 9092)
    assert split_address("[::1]:9092") == ("::1", 9092)
    with pytest.raises(DeployError, match="is not HOST:PORT"):
        split_address("superlink.example.org")


def test_session_supervision_finds_and_stops_a_process_group(tmp_path: Path) -> None:
    """A real `sleep` in its own session: found with its child, told from a reused pid, stopped."""
    command = ["/bin/sh", "-c", "sleep 60 & exec sleep 60"]
    process = start_process("sleeper", command, tmp_path / "sleeper.log", tmp_path, dict(os.environ))
    try:
        record = ManagedProcess("sleeper", process.pid, process_start(process.pid), "", command)
        wait_until_ready(
            [ReadinessCheck("sleeper", process, tmp_path / "x", lambda: len(live_session_members(record)) == 2, "")],
            10,
        )
        impostor = ManagedProcess("sleeper", process.pid, (record.start_ticks or 0) + 1, "", command)
        assert live_session_members(impostor) == []
        assert stop_processes([record], grace_s=5) == []  # ended by SIGTERM, no SIGKILL needed
        assert live_session_members(record) == []
        assert (tmp_path / "sleeper.log").read_text().startswith("# sleeper: /bin/sh")
    finally:
        process.kill()
        process.wait()


def test_wait_until_ready_names_the_log_of_a_process_that_died(tmp_path: Path) -> None:
    log = tmp_path / "superlink.log"
    log.write_text("starting\nExit Code: 3\nAddress already in use\nFor more information, visit: x\n")
    process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    process.wait()
    assert log_hint(log) == "Flower exit code 3: Address already in use"
    traceback = tmp_path / "supernode.log"
    traceback.write_text("ERROR: No SuperNode found with the given public key.\nTraceback ...\nRuntimeError: x\n")
    assert log_hint(traceback) == "ERROR: No SuperNode found with the given public key."
    with pytest.raises(DeployError, match=r"superlink exited with code 3 before .*superlink.log .*exit code 3"):
        wait_until_ready([ReadinessCheck("superlink", process, log, lambda: False, "ports open")], 5)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with pytest.raises(DeployError, match=r"did not come up \(ports open\) within 0.2 s"):
            wait_until_ready([ReadinessCheck("superlink", alive, log, lambda: False, "ports open")], 0.2)
    finally:
        alive.kill()
        alive.wait()


def test_check_ports_free_names_a_busy_port() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(DeployError, match=rf"port 127.0.0.1:{port} is already in use"):
            check_ports_free("127.0.0.1", [port])
