"""The warm ClientApp start (fedcifar_app/client/warm): its pieces, a real warm parent with its shim,
and real deployments (`fedcifar-deploy up`, a hand-started `fedcifar-warm flower-supernode`).

What each deployment test shows, judged by what the run wrote and what the processes logged:
- warm and cold runs of the same seed give the same metrics; each warm ClientApp ran the FAB's code
  (an instrumented app copy, tests/support/instrumented_app.py) with a cold process's thread counts;
- the warm parent killed mid-run: the remaining messages start cold, one warning line each, and the
  run completes; `status` says so; SuperNodes killed: their warm parent ends with them;
- a ClientApp that crashes in training is named in its round's failures, as a cold one is;
- `fedcifar-deploy down` leaves no process of the warm path;
- a plain `flower-supernode` under `fedcifar-warm` is served warm with its own thread settings, and
  the wrapper ends with it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.deployment import DEPLOY_TIMEOUT_S, LocalDeployment, free_port_block, kill_group
from support.flwr_run import BIN, FlwrRun, flwr_environment
from support.instrumented_app import CRASH_NODE_ENV, CRASH_ROUND_ENV, RECORD_ENV, instrumented_app, records

from fedcifar_app.client.warm import protocol
from fedcifar_app.client.warm.child import exit_code, openblas_threads, torch_threads
from fedcifar_app.client.warm.folder import WarmFolder
from fedcifar_app.client.warm.fork_safety import load_time_differences, shared_namespaces
from fedcifar_app.client.warm.shim import real_clientapp
from fedcifar_app.deploy.commands import supernode_command
from fedcifar_app.procfs import all_processes, read_proc_stat, session_members

SUPPORT = Path(__file__).resolve().parent / "support"
COLD_WARNING = "warm ClientApp start unavailable"
FAILURE_PREFIX = "WARNING :   round "
READY_TIMEOUT_S = 120


# --------------------------------------------------------------------------- pieces
def test_messages_carry_fields_and_stdio_descriptors() -> None:
    """One SEQPACKET message: JSON fields (bytes that are not UTF-8 survive) and file descriptors."""
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    read_end, write_end = os.pipe()
    odd = os.fsdecode(b"caf\xe9")  # an environment value that is not UTF-8
    with left, right:
        protocol.send(left, protocol.REQUEST, fds=[write_end], environ=[f"X={odd}"])
        message, fds = protocol.receive(right, max_fds=3)
        assert message == {"kind": protocol.REQUEST, "environ": [f"X={odd}"]}
        assert os.fsencode(message["environ"][0]) == b"X=caf\xe9"
        os.write(fds[0], b"through the passed descriptor")
        os.close(fds[0])
        os.close(write_end)
        assert os.read(read_end, 100) == b"through the passed descriptor"
        os.close(read_end)
        right.send(b"not ours")
        with pytest.raises(protocol.ProtocolError, match="not a warm-start message"):
            protocol.receive(left)
        right.close()
        assert protocol.receive(left) == (None, [])


def test_the_largest_request_fits_one_socket_message() -> None:
    """A request up to MAX_MESSAGE_BYTES goes through a socket with Linux's default send buffer; a larger
    one is refused before it is sent (the shim then starts cold, naming the size)."""
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    envelope = len(protocol.MAGIC) + len('{"kind": "request", "environ": ""}')
    with left, right:
        largest = "x" * (protocol.MAX_MESSAGE_BYTES - envelope)
        protocol.send(left, protocol.REQUEST, environ=largest)
        assert protocol.receive(right)[0] == {"kind": protocol.REQUEST, "environ": largest}
        with pytest.raises(protocol.ProtocolError, match=f"is over {protocol.MAX_MESSAGE_BYTES}"):
            protocol.send(left, protocol.REQUEST, environ=largest + "x")


def test_shim_finds_flowers_own_clientapp_after_itself(tmp_path: Path) -> None:
    shim_dir, other, flower = tmp_path / "warm-bin", tmp_path / "other", tmp_path / "flower-bin"
    for folder in (shim_dir, other, flower):
        folder.mkdir()
    script = tmp_path / "fedcifar-warm-shim"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    (shim_dir / "flwr-clientapp").symlink_to(script)
    (other / "flwr-clientapp").write_text("not executable")
    real = flower / "flwr-clientapp"
    real.write_text("#!/bin/sh\n")
    real.chmod(0o755)
    path = os.pathsep.join(map(str, (shim_dir, other, flower)))
    assert real_clientapp(path, str(shim_dir / "flwr-clientapp")) == str(real)
    assert real_clientapp(str(shim_dir), str(shim_dir / "flwr-clientapp")) is None


def test_folder_is_owner_only_and_puts_the_shim_first(tmp_path: Path) -> None:
    folder = WarmFolder.prepare(tmp_path / "warm")
    assert (folder.path.stat().st_mode & 0o777) == 0o700
    assert Path(os.readlink(folder.bin / "flwr-clientapp")) == BIN / "fedcifar-warm-shim"
    env = folder.environment({"PATH": "/usr/bin", "HOME": "/h"})
    assert env["PATH"] == f"{folder.bin}{os.pathsep}/usr/bin" and env[protocol.SOCKET_ENV] == str(folder.socket_path)
    folder.path.chmod(0o755)
    assert (WarmFolder.prepare(tmp_path / "warm").path.stat().st_mode & 0o777) == 0o700  # made private again
    assert not folder.answers()


def test_what_a_fork_cannot_change_must_match() -> None:
    """Variables read at interpreter start or library load must equal the parent's; thread counts are set."""
    parent = {"PYTHONPATH": "/a", "OMP_NUM_THREADS": "2", "FLWR_HOME": "/p", "HOME": "/h"}
    node = {"PYTHONPATH": "/b", "OMP_NUM_THREADS": "1", "FLWR_HOME": "/n", "FLWR_TELEMETRY_ENABLED": "0"}
    assert load_time_differences(parent, node) == ["FLWR_TELEMETRY_ENABLED", "PYTHONPATH"]
    assert load_time_differences(parent, {**parent, "FLWR_HOME": "/n", "OMP_NUM_THREADS": "1"}) == []


def test_a_peer_the_parent_cannot_see_shares_no_namespace() -> None:
    """SO_PEERCRED gives pid 0 for a shim in another pid namespace (a container sharing the socket
    folder): its ClientApp would fork into the wrong network, so the start must be refused (cold)."""
    assert shared_namespaces(os.getpid()) is None
    assert shared_namespaces(0) == "pid namespace"


def test_thread_counts_are_a_cold_processs() -> None:
    """This torch wheel (OpenMP + MKL) and numpy's OpenBLAS, as measured in cold processes on it:
    MKL_NUM_THREADS before OMP_NUM_THREADS, capped at the machine's cores; else the usable cores."""
    assert torch_threads({}, allowed_cores=2, machine_cores=4) == 2
    assert torch_threads({"OMP_NUM_THREADS": "1"}, 2, 4) == 1
    assert torch_threads({"OMP_NUM_THREADS": "8", "MKL_NUM_THREADS": "3"}, 2, 4) == 3
    assert torch_threads({"OMP_NUM_THREADS": "8"}, 2, 4) == 4
    assert torch_threads({"OMP_NUM_THREADS": "4,2"}, 2, 4) == 4  # nested OpenMP levels: the first
    assert torch_threads({"OMP_NUM_THREADS": "0"}, 2, 4) == 2  # invalid: as if unset
    assert openblas_threads({"OMP_NUM_THREADS": "3", "OPENBLAS_NUM_THREADS": "1"}, 2, 4) == 1
    assert openblas_threads({"OMP_NUM_THREADS": "3"}, 2, 4) == 3


def test_exit_codes_are_sys_exits() -> None:
    assert [exit_code(None), exit_code(0), exit_code(3), exit_code(256), exit_code(-1)] == [0, 0, 3, 0, 255]


# --------------------------------------------------------------------------- a real warm parent and its shim
class Parent:
    """`fedcifar-warm --dir DIR` serving until stopped; the shim as SuperExec would run it."""

    def __init__(self, root: Path, *preload: str, env: dict[str, str] | None = None):
        root.mkdir(parents=True, exist_ok=True)
        self.folder_path = root / "warm"
        self.log = root / "parent.log"
        self.env = dict(env or os.environ)
        command = [str(BIN / "fedcifar-warm"), "--dir", str(self.folder_path)]
        command += [arg for module in preload for arg in ("--preload", module)]
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + READY_TIMEOUT_S
        while "ready on" not in self.log.read_text():
            assert self.process.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.1)
        self.folder = WarmFolder(self.folder_path)

    def shim(self, *args: str, env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()):
        """`flwr-clientapp ARGS` found by name on the warm PATH, as SuperExec starts it (not waited for)."""
        env = self.folder.environment(env or self.env)
        env["PATH"] = f"{env['PATH']}{os.pathsep}{BIN}"
        return subprocess.Popen(
            [*prefix, "flwr-clientapp", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def children(self) -> list[int]:
        return [pid for pid, stat in all_processes().items() if stat.parent == self.process.pid and stat.alive]

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=30)
        kill_group(self.process.pid)
        return self.log.read_text()


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> Iterator[Parent]:
    warm = Parent(tmp_path_factory.mktemp("warm-parent"))
    try:
        yield warm
    finally:
        warm.stop()


@pytest.mark.slow
def test_shim_runs_flower_warm_with_its_exit_code(parent: Parent) -> None:
    helped = parent.shim("--help")
    out, err = helped.communicate(timeout=60)
    assert helped.returncode == 0 and "usage: flwr-clientapp" in out, err
    assert COLD_WARNING not in err
    wrong = parent.shim("--no-such-flag")
    _, err = wrong.communicate(timeout=60)
    assert wrong.returncode == 2 and "unrecognized arguments: --no-such-flag" in err  # Flower's own argparse


@pytest.mark.slow
def test_shim_passes_signals_on_and_dies_like_its_child(parent: Parent) -> None:
    """SIGUSR1 to the shim reaches the warm child (which Flower leaves at the default: it dies of it,
    not of the SIGKILL a child gets when its shim is gone), and the shim then ends by the same signal,
    as the cold process would."""
    before = set(parent.children())
    blocked = parent.shim(
        "--insecure", "--clientappio-api-address", f"127.0.0.1:{free_port_block(1)[0]}", "--token", "t"
    )
    deadline = time.monotonic() + 60
    while not set(parent.children()) - before:
        assert blocked.poll() is None and time.monotonic() < deadline, blocked.communicate()
        time.sleep(0.05)
    (child,) = set(parent.children()) - before
    # Forked with one thread; its first thread after the shim's "go" (which comes once the shim forwards
    # signals) watches the shim. From then on it runs Flower's flwr-clientapp.
    while (stat := read_proc_stat(child)) is None or stat.threads < 2:
        assert blocked.poll() is None and time.monotonic() < deadline, blocked.communicate()
        time.sleep(0.05)
    blocked.send_signal(signal.SIGUSR1)
    blocked.communicate(timeout=30)
    assert blocked.returncode == -signal.SIGUSR1
    deadline = time.monotonic() + 10
    while f"ClientApp pid {child} ended" not in parent.log.read_text():
        assert time.monotonic() < deadline, "the warm child outlived its shim"
        time.sleep(0.05)
    assert f"ClientApp pid {child} ended (exit code {-signal.SIGUSR1})" in parent.log.read_text()


@pytest.mark.slow
def test_a_refused_start_runs_cold_with_one_warning(parent: Parent, tmp_path: Path) -> None:
    """The SuperNode's PYTHONHASHSEED differs from the parent's: a fork cannot take it on, so cold."""
    refused = parent.shim("--help", env={**parent.env, "PYTHONHASHSEED": "7"})
    out, err = refused.communicate(timeout=120)
    assert refused.returncode == 0 and "usage: flwr-clientapp" in out  # Flower's own, cold
    (warning,) = err.strip().splitlines()
    assert COLD_WARNING in warning and "PYTHONHASHSEED differ" in warning, err

    if shutil.which("unshare") and subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0:
        elsewhere = parent.shim("--help", prefix=("unshare", "-n"))  # another network namespace
        _, err = elsewhere.communicate(timeout=120)
        assert elsewhere.returncode == 0 and "net namespace" in err and err.count("WARNING") == 1, err


@pytest.mark.slow
def test_an_unsafe_or_missing_parent_means_cold_with_one_warning(tmp_path: Path) -> None:
    """A parent that runs a Python thread (injected by a preloaded module) refuses every start; a
    parent that is gone cannot be reached; both times the message runs cold with one warning line."""
    env = {**os.environ, "PYTHONPATH": str(SUPPORT)}  # the parent's and the SuperNode's alike
    unsafe = Parent(tmp_path / "unsafe", "thread_starter", "numpy", env=env)
    try:
        refused = unsafe.shim("--help")
        out, err = refused.communicate(timeout=120)
        assert refused.returncode == 0 and "usage: flwr-clientapp" in out
        (warning,) = err.strip().splitlines()
        assert "Python threads besides its main one (injected-by-a-test)" in warning, err
    finally:
        log = unsafe.stop()
    assert "0 ClientApps started warm" in log and "1 refused" in log, log
    assert not unsafe.folder.socket_path.exists()  # removed on the way out
    gone = unsafe.shim("--help")
    out, err = gone.communicate(timeout=120)
    assert gone.returncode == 0 and "usage: flwr-clientapp" in out
    assert err.count("WARNING") == 1 and f"no warm parent at {unsafe.folder.socket_path}" in err, err


# --------------------------------------------------------------------------- real deployments
def run_config(
    output_dir: Path, rounds: int, nodes: int, train_nodes: int | None = None, round_timeout: int = 240
) -> str:
    """A small synthetic run on `nodes` SuperNodes; ONE string, as `flwr run` needs."""
    return (
        f"num-server-rounds={rounds} min-train-nodes={train_nodes or nodes} min-evaluate-nodes=1 "
        f"min-available-nodes={nodes} dataset='synthetic' output-dir='{output_dir}' node-wait-timeout=60 "
        f"round-timeout={round_timeout}"
    )


def failures(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith(FAILURE_PREFIX) and " failed: " in line]


def warm_path_processes(deployment: LocalDeployment) -> list[str]:
    """Command lines of live processes that belong to the warm path (its parent, children, shims)."""
    folder = str(deployment.dir / "warm")
    found = []
    for pid, stat in all_processes().items():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if stat.alive and folder in cmdline:
            found.append(f"{pid}: {cmdline}")
    return found


@pytest.fixture
def app_copy(tmp_path: Path) -> Path:
    return instrumented_app(tmp_path / "app")


@pytest.fixture
def deployment(tmp_path: Path, app_copy: Path) -> Iterator[LocalDeployment]:
    env = {**flwr_environment(tmp_path / "cache"), RECORD_ENV: str(tmp_path / "records.jsonl")}
    federation = LocalDeployment(tmp_path, env, nodes=2, spare_ports=0)
    try:
        yield federation
    finally:
        federation.teardown()


@pytest.mark.slow
def test_warm_and_cold_runs_agree_and_warm_runs_the_fab(deployment: LocalDeployment, app_copy, tmp_path) -> None:
    printed = deployment.up()
    assert "ClientApps: warm start" in printed
    parent = deployment.record("warm-start")
    warm = deployment.run(run_config(tmp_path / "warm", 2, 2), tmp_path / "warm", app_copy)
    assert warm.status["status"] == "completed", warm.output[-3000:]
    warm_records = records(tmp_path / "records.jsonl")
    assert "ClientApps: warm start" in deployment.deploy_cli("status").stdout
    deployment.down()
    assert warm_path_processes(deployment) == [] and session_members(parent.pid) == []
    assert "8 ClientApps started warm" in Path(parent.log).read_text() and "0 refused" in Path(parent.log).read_text()

    (tmp_path / "records.jsonl").rename(tmp_path / "warm-records.jsonl")
    assert "ClientApps: cold start" in deployment.up("--cold")
    assert not (deployment.dir / "warm" / "parent.sock").exists()
    cold = deployment.run(run_config(tmp_path / "cold", 2, 2), tmp_path / "cold", app_copy)
    assert cold.status["status"] == "completed", cold.output[-3000:]
    cold_records = records(tmp_path / "records.jsonl")

    # The same seed, the same run: equal metrics (the issue allows 0.005 of central accuracy).
    assert [row["round"] for row in warm.metrics] == [row["round"] for row in cold.metrics] == [0, 1, 2]
    for warm_row, cold_row in zip(warm.metrics, cold.metrics, strict=True):
        assert abs(warm_row["central-accuracy"] - cold_row["central-accuracy"]) <= 0.005, (warm_row, cold_row)
    # 2 queries + 2 x (2 train + 1 evaluate) messages; each ran the FAB's copy of the app (only it records).
    assert len(warm_records) == len(cold_records) == 8, (warm_records, cold_records)
    for record in warm_records + cold_records:
        assert record["file"].startswith(str(deployment.dir / "flwr-home")) and "/apps/" in record["file"], record
    assert {record["ppid"] for record in warm_records} == {parent.pid}  # forked by the warm parent
    assert parent.pid not in {record["ppid"] for record in cold_records}
    # Threads: what a cold ClientApp of the same SuperNode has.
    threads = {(record["torch_threads"], record["openblas_threads"]) for record in cold_records}
    assert {(record["torch_threads"], record["openblas_threads"]) for record in warm_records} == threads


@pytest.mark.slow
def test_warm_parent_killed_mid_run_the_rest_runs_cold(deployment: LocalDeployment, app_copy, tmp_path) -> None:
    deployment.up()
    run = deployment.start_run(run_config(tmp_path / "out", 3, 2), tmp_path / "out", app_copy)
    run.wait_for("round 1 in metrics.json", lambda: any(row["round"] == 1 for row in run.metrics))
    parent = deployment.record("warm-start")
    os.kill(parent.pid, signal.SIGKILL)  # the parent only: a ClientApp it forked may still be running
    run.wait()
    assert run.status["status"] == "completed" and [row["round"] for row in run.metrics] == [0, 1, 2, 3]
    assert not failures(run.output), run.output[-3000:]

    cold_starts = 0
    for name in ("supernode-0", "supernode-1"):
        log = deployment.node_log(name).read_text()
        warnings = [line for line in log.splitlines() if COLD_WARNING in line]
        assert all("no warm parent at" in line for line in warnings), warnings
        cold_starts += len(warnings)
    ran_after = [record for record in records(tmp_path / "records.jsonl") if record["ppid"] != parent.pid]
    assert cold_starts == len(ran_after) >= 3, (cold_starts, ran_after)  # round 3 at least: one line each
    status = deployment.deploy_cli("status")
    assert status.returncode == 1 and "ClientApps: cold, each with a warning" in status.stdout, status.stdout


@pytest.mark.slow
def test_warm_parent_ends_with_its_supernodes(deployment: LocalDeployment) -> None:
    """SIGKILLed SuperNodes (their whole process groups) take their warm parent along: it serves nobody
    any more, so it removes its socket and ends, as a SuperNode's SuperExec ends with it."""
    deployment.up()
    parent = deployment.record("warm-start")
    for name in ("supernode-0", "supernode-1"):
        deployment.kill(name)
    deadline = time.monotonic() + 15
    while session_members(parent.pid):
        assert time.monotonic() < deadline, (
            f"the warm parent outlived its SuperNodes: {warm_path_processes(deployment)}"
        )
        time.sleep(0.1)
    assert not (deployment.dir / "warm" / "parent.sock").exists()
    assert "ends; 0 ClientApps started warm" in deployment.warm_parent_log.read_text()


@pytest.mark.slow
def test_a_crashing_warm_clientapp_is_named_in_its_round(deployment: LocalDeployment, app_copy, tmp_path) -> None:
    """The ClientApp of partition 1/2 SIGKILLs itself while training round 1: the round aggregates the
    other node, names this one, and the run completes; the same as a cold ClientApp that crashes.

    Flower 1.25 never delivers its own error reply for a ClientApp that died (the SuperNode's
    `_push_messages` fails with "Start time or end time for message ID ... is missing"), cold or warm,
    so the node is named when round-timeout ends the round: 45 s here."""
    deployment.env.update({CRASH_NODE_ENV: "partition 1/2", CRASH_ROUND_ENV: "1"})
    deployment.up()
    config = run_config(tmp_path / "out", 2, 2, train_nodes=1, round_timeout=45)
    run = deployment.run(config, tmp_path / "out", app_copy)
    assert run.status["status"] == "completed", run.output[-3000:]
    (line,) = failures(run.output)
    assert "round 1 train: node partition 1/2 failed: no reply within round-timeout=45s" in line, line
    parent = deployment.record("warm-start").pid
    assert {record["ppid"] for record in records(tmp_path / "records.jsonl")} == {parent}  # all warm, the crash too
    log = deployment.node_log("supernode-1").read_text()
    assert "Traceback" not in log and COLD_WARNING not in log, log[-3000:]  # the shim ended as its child: killed


@pytest.mark.slow
def test_plain_supernode_under_fedcifar_warm(tmp_path: Path, app_copy: Path) -> None:
    """`fedcifar-warm flower-supernode ...` (docs/deployment.md): served warm, with the thread settings
    the SuperNode itself has (not the wrapper's), and the wrapper ends with its SuperNode."""
    env = {**flwr_environment(tmp_path / "cache"), RECORD_ENV: str(tmp_path / "records.jsonl")}
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env.pop(name, None)  # the warm parent loads torch with the machine's default thread count
    deployment = LocalDeployment(tmp_path, env, nodes=0, spare_ports=2)
    wrappers: list[subprocess.Popen] = []
    try:
        deployment.up()
        for index, port in enumerate(deployment.spare_ports):
            supernode = supernode_command(
                deployment.fleet_address, f"127.0.0.1:{port}", f"partition-id={index} num-partitions=2", None
            )
            log = (tmp_path / f"wrapper-{index}.log").open("wb")
            wrappers.append(
                subprocess.Popen(
                    [str(BIN / "fedcifar-warm"), "env", "OMP_NUM_THREADS=1", *supernode],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        run = FlwrRun(
            tmp_path / "out",
            run_config(tmp_path / "out", 1, 2),
            env=env,
            federation=deployment.federation_args(),
            extra_args=("--stream",),
            app_dir=app_copy,
        )
        run.start().wait()
        assert run.status["status"] == "completed", run.output[-3000:]
        found = records(tmp_path / "records.jsonl")
        assert len(found) == 5 and {r["ppid"] for r in found} == {w.pid for w in wrappers}, found
        cold = subprocess.run(
            [sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
            env={**env, "OMP_NUM_THREADS": "1"},
            capture_output=True,
            text=True,
            check=True,
        )
        assert {r["torch_threads"] for r in found} == {int(cold.stdout)} and {r["openblas_threads"] for r in found} == {
            1
        }
        for wrapper in wrappers:
            wrapper.send_signal(signal.SIGTERM)  # passed on to the SuperNode; the wrapper ends with it
        codes = [wrapper.wait(timeout=60) for wrapper in wrappers]
        assert codes == [0, 0], [(tmp_path / f"wrapper-{i}.log").read_text()[-2000:] for i in range(2)]
        for index, wrapper in enumerate(wrappers):
            text = (tmp_path / f"wrapper-{index}.log").read_text()
            assert COLD_WARNING not in text and "0 refused" in text, text[-2000:]
            assert session_members(wrapper.pid) == [], "the wrapper left processes behind"
    finally:
        for wrapper in wrappers:
            kill_group(wrapper.pid)
            wrapper.wait(timeout=DEPLOY_TIMEOUT_S)
        deployment.teardown()
