"""docs/deployment.md's "On several machines" section, run across Linux network namespaces.

One namespace per machine: the SuperLink host, three SuperNode hosts (each with its own
data folder and its own warm ClientApp parent), an unregistered SuperNode host and the user's machine running `flwr`,
joined by a bridge with addresses in 10.201.7.0/24 that exist only inside namespaces this
test creates (tests/support/netns.py). Nothing else is ever contacted. The commands are the
page's own (checked verbatim), with the page's example names replaced by the test's.
Every namespace, link and process is removed at the end, also when the test fails.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.datasets import make_parquet_dataset
from support.deployment import kill_group
from support.flwr_run import BIN, PROJECT
from support.netns import Network, netns_unavailable

from fedcifar_app.deploy.certificates import ensure_tls_files
from fedcifar_app.deploy.flwr_cli import CONTROL_FEDERATION
from fedcifar_app.deploy.processes import ANSI_ESCAPE

pytestmark = pytest.mark.slow

DEPLOYMENT_DOC = (PROJECT / "docs" / "deployment.md").read_text(encoding="utf-8")
EXAMPLE_CA = "/home/me/ca.crt"
# The page's commands, in the order a user types them (the test fills in its own names).
SUPERLINK = "fedcifar-deploy superlink --public-name superlink.example.org --dir /srv/fedcifar/deploy"
KEY = "fedcifar-deploy key supernode.key"
REGISTER = "fedcifar-deploy register supernode.key.pub --dir /srv/fedcifar/deploy"
CHECK = "fedcifar-deploy check --superlink superlink.example.org:9092 --ca ca.crt"
SUPERNODE = (
    "fedcifar-deploy supernode --superlink superlink.example.org:9092 --ca ca.crt --key supernode.key "
    "--node-config \"data-path='/data/site-a'\""
)
RUN = (
    "flwr run . local-deployment-tls --stream "
    f"--federation-config \"address='superlink.example.org:9093' root-certificates='{EXAMPLE_CA}'\""
)
DOWN_SUPERLINK = "fedcifar-deploy down --dir /srv/fedcifar/deploy"
DOWN_SUPERNODE = "fedcifar-deploy down"
DOC_COMMANDS = (SUPERLINK, KEY, REGISTER, CHECK, SUPERNODE, RUN, DOWN_SUPERLINK, DOWN_SUPERNODE)
NODES = ("site-a", "site-b", "site-c")
FAILURE_LINE = re.compile(r"WARNING\s*:\s+round (\d+) (train|evaluate): node (.+?) failed: (.*)")


def test_deployment_doc_shows_these_commands() -> None:
    """The commands this test runs are docs/deployment.md's, word for word (multi-line blocks joined)."""
    flat = " ".join(DEPLOYMENT_DOC.replace("\\\n", " ").split())
    for command in DOC_COMMANDS:
        assert " ".join(command.split()) in flat, f"docs/deployment.md lacks: {command}"


class Hosts:
    """The machines of the page's section, as namespaces, and a way to type commands on each."""

    def __init__(self, root: Path, network: Network):
        self.root = root
        self.network = network
        self.superlink_ip = network.add_host("superlink", 1, extra_numbers=(2,))  # .2: a name not in the cert
        self.folders = {"superlink": root / "superlink", "user": root / "user", "intruder": root / "intruder"}
        for number, node in enumerate(NODES, start=11):
            network.add_host(node, number)
            self.folders[node] = root / node
        network.add_host("intruder", 19)
        network.add_host("user", 20)
        for folder in self.folders.values():
            folder.mkdir(parents=True)
        self.outputs = root / "outputs"
        self.data = {
            node: make_parquet_dataset(root / "data" / node, n_train=60, n_test=20, seed=i)
            for i, node in enumerate(NODES)
        }
        self.background: list[subprocess.Popen] = []

    def words(self, command: str, node: str = "site-a") -> list[str]:
        """The page's command with the test's names, as argv (fedcifar-deploy via this interpreter)."""
        replacements = {
            "superlink.example.org": self.superlink_ip,
            "/srv/fedcifar/deploy": str(self.folders["superlink"] / "deploy"),
            "/srv/fedcifar/outputs": str(self.outputs),
            "/data/site-a": str(self.data.get(node, "")),
            EXAMPLE_CA: str(self.folders["user"] / "ca.crt"),
        }
        for example, actual in replacements.items():
            command = command.replace(example, actual)
        argv = shlex.split(command)
        if argv[0] == "fedcifar-deploy":
            return [sys.executable, "-m", "fedcifar_app.deploy", *argv[1:]]
        return [str(BIN / argv[0]), *argv[1:]]

    def env(self, host: str) -> dict[str, str]:
        return dict(
            os.environ,
            FLWR_HOME=str(self.folders[host] / "flwr-home"),
            FEDCIFAR_CACHE_DIR=str(self.root / "cache" / host),
            PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        )

    def on(self, host: str, argv: list[str], timeout_s: float = 180, cwd: Path | None = None):
        """Run `argv` on `host` and wait (bounded); the CompletedProcess."""
        return subprocess.run(
            [*self.network.exec_prefix(host), *argv],
            cwd=cwd or self.folders[host],
            env=self.env(host),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            stdin=subprocess.DEVNULL,
        )

    def typed(self, host: str, command: str, node: str = "site-a", *, ok: bool = True) -> subprocess.CompletedProcess:
        """A command of the page typed on `host`; by default it must succeed."""
        result = self.on(host, self.words(command, node))
        if ok:
            assert result.returncode == 0, f"{host}: {command}\n{result.stdout}\n{result.stderr}"
        return result

    def start_run(self, run_config: str, log_name: str) -> tuple[subprocess.Popen, Path]:
        """`flwr run` on the user's machine, in the background (its own session)."""
        log = self.root / f"{log_name}.log"
        argv = [*self.network.exec_prefix("user"), *self.words(RUN), "--run-config", run_config]
        with log.open("wb") as stream:
            process = subprocess.Popen(
                argv,
                cwd=PROJECT,
                env=self.env("user"),
                stdout=stream,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.background.append(process)
        return process, log

    def reachable(self, host: str, address: str, port: int) -> bool:
        code = f"import socket; socket.create_connection(({address!r}, {port}), timeout=3).close()"
        return self.on(host, [sys.executable, "-c", code], timeout_s=30).returncode == 0

    def supernodes(self) -> dict[int, str]:
        """node id -> online/offline, as the SuperLink's control project reports it (on the SuperLink host)."""
        control = self.folders["superlink"] / "deploy" / "control"
        flwr = str(BIN / "flwr")
        result = self.on("superlink", [flwr, "supernode", "list", str(control), CONTROL_FEDERATION, "--format", "json"])
        answer = json.loads(result.stdout[result.stdout.find("{") :])
        return {int(node["node-id"]): node["status"] for node in answer["nodes"]}

    def close(self) -> None:
        for process in self.background:
            kill_group(process.pid)
            process.wait(timeout=10)
        for host in ("intruder", *NODES, "superlink"):
            deploy_dir = self.folders[host] / ("deploy" if host == "superlink" else ".deploy")
            if (deploy_dir / "state.json").is_file():
                subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "fedcifar_app.deploy",
                        "down",
                        "--dir",
                        str(deploy_dir),
                        "--stop-grace",
                        "3",
                    ],
                    capture_output=True,
                    timeout=60,
                )
        self.network.close()


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[Hosts]:
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    network = Network()
    machines = None
    try:
        machines = Hosts(tmp_path, network)
        yield machines
    finally:
        if machines is not None:
            machines.close()  # stops the deployments, then the network
        network.close()
        assert not network.leftovers(), f"namespaces left behind: {network.leftovers()}"


def node_id(log: Path) -> int:
    return int(re.findall(r"SuperNode ID: (\d+)", ANSI_ESCAPE.sub("", log.read_text()))[-1])


def run_config(output_dir: Path, rounds: int, nodes: int) -> str:
    """A small run that needs `nodes` SuperNodes connected, and training, in every round."""
    return (
        f"num-server-rounds={rounds} dataset='synthetic' output-dir='{output_dir}' min-available-nodes={nodes} "
        f"min-train-nodes={nodes} min-evaluate-nodes=1 node-wait-timeout=60 round-timeout=240"
    )


def completed_run(hosts: Hosts, process: subprocess.Popen, log: Path, timeout_s: float = 300) -> tuple[str, str]:
    """(run id, server log) of a `flwr run` that must end with a completed run folder."""
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pytest.fail(f"flwr run still running after {timeout_s} s:\n{log.read_text()[-3000:]}")
    output = ANSI_ESCAPE.sub("", log.read_text(errors="replace"))
    run_id = re.search(r"started run (\d+)", output)
    assert run_id, output[-3000:]
    return run_id[1], output


def test_the_readme_across_hosts(hosts: Hosts, tmp_path: Path) -> None:
    ip = hosts.superlink_ip
    # A SuperNode host before the SuperLink is up: one line naming host, port and what to do.
    early = hosts.typed("site-a", CHECK, ok=False)
    assert early.returncode == 1 and f"{ip}:9092 refused the connection" in early.stderr, early.stderr
    assert early.stderr.count("\n") == 1

    started = hosts.typed("superlink", SUPERLINK)
    assert f"other machines: flower-supernode --superlink {ip}:9092" in started.stdout, started.stdout
    ca = hosts.folders["superlink"] / "deploy" / "certs" / "ca.crt"
    for host in (*NODES, "intruder", "user"):  # "copy ca.crt to every machine"
        shutil.copy(ca, hosts.folders[host] / "ca.crt")

    for node in (*NODES, "intruder"):
        hosts.typed(node, KEY)
    for node in NODES:  # hand over the .pub; register it on the SuperLink host
        shutil.copy(hosts.folders[node] / "supernode.key.pub", hosts.folders["superlink"] / "supernode.key.pub")
        assert "node id" in hosts.typed("superlink", REGISTER).stdout

    # What a user trips on, each named in one line: a wrong CA, a name not in the certificate.
    shutil.copy(
        ensure_tls_files(tmp_path / "other-ca", ["localhost"]).ca_certificate, hosts.folders["site-a"] / "ca.crt"
    )
    wrong_ca = hosts.typed("site-a", CHECK, ok=False)
    assert f"certificate of {ip}:9092 is not signed by" in wrong_ca.stderr and "copy ca.crt" in wrong_ca.stderr
    refused_start = hosts.typed("site-a", SUPERNODE, ok=False)
    assert refused_start.returncode == 1 and "is not signed by" in refused_start.stderr, refused_start.stderr
    shutil.copy(ca, hosts.folders["site-a"] / "ca.crt")
    unnamed = hosts.on("site-a", hosts.words(CHECK.replace("superlink.example.org", "10.201.7.2")))
    assert "does not name 10.201.7.2" in unnamed.stderr and "--tls-san 10.201.7.2" in unnamed.stderr, unnamed.stderr
    hosts.typed("site-a", CHECK)

    for node in NODES:
        hosts.typed(node, SUPERNODE, node)
    intruder = hosts.typed("intruder", SUPERNODE, ok=False)
    assert intruder.returncode == 1 and "No SuperNode found with the given public key" in intruder.stderr, (
        intruder.stderr
    )

    # Only Fleet and Control face the network.
    assert hosts.reachable("user", ip, 9092) and hosts.reachable("user", ip, 9093)
    assert not hosts.reachable("user", ip, 9091), "ServerAppIo is reachable from another host"
    assert not hosts.reachable("user", "10.201.7.11", 9094), "ClientAppIo is reachable from another host"

    # A run on three nodes; site-c's link is cut in round 2 of 2 (needing only 2 nodes lets it finish).
    out = hosts.outputs / "first"
    process, log = hosts.start_run(run_config(out, 2, 2), "first")
    deadline = time.monotonic() + 240
    while not list(out.glob("*/metrics.json")) or '"round": 1' not in next(out.glob("*/metrics.json")).read_text():
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)
    cut_id = node_id(hosts.folders["site-c"] / ".deploy" / "logs" / "supernode.log")
    hosts.network.cut("site-c")
    _, output = completed_run(hosts, process, log)
    hosts.network.plug("site-c")
    folder = next(out.iterdir())
    assert json.loads((folder / "status.json").read_text())["status"] == "completed", output[-3000:]
    assert "Data check: 3 nodes ready" in output, output[-3000:]
    failures = [m.groups() for m in map(FAILURE_LINE.search, output.splitlines()) if m]
    assert len(failures) == 1 and failures[0][0] == "2" and failures[0][2] == f"data-path={hosts.data['site-c']}", (
        failures
    )

    # Plugged back in, site-c is online again under its id and trains in the next run (all three needed).
    deadline = time.monotonic() + 120
    while hosts.supernodes().get(cut_id) != "online":
        assert time.monotonic() < deadline, f"site-c did not come back: {hosts.supernodes()}"
        time.sleep(2)
    second_out = hosts.outputs / "second"
    process, log = hosts.start_run(run_config(second_out, 1, 3), "second")
    run_id, output = completed_run(hosts, process, log)
    assert json.loads((next(second_out.iterdir()) / "status.json").read_text())["status"] == "completed", output[-3000:]
    assert f"[RUN {run_id}]" in (hosts.folders["site-c"] / ".deploy" / "logs" / "supernode.log").read_text()

    # The SuperLink restarts: it registers the kept keys again; each SuperNode host restarts its node.
    hosts.typed("superlink", DOWN_SUPERLINK)
    hosts.typed("superlink", SUPERLINK)
    for node in NODES:
        hosts.typed(node, DOWN_SUPERNODE)
        hosts.typed(node, SUPERNODE, node)
    third_out = hosts.outputs / "third"
    process, log = hosts.start_run(run_config(third_out, 1, 3), "third")
    _, output = completed_run(hosts, process, log)
    assert json.loads((next(third_out.iterdir()) / "status.json").read_text())["status"] == "completed", output[-3000:]

    # Each SuperNode host served every ClientApp from its own warm parent, inside its own namespace
    # (`fedcifar-deploy supernode` starts one beside the SuperNode): no cold start, no refusal.
    for node in NODES:
        logs = hosts.folders[node] / ".deploy" / "logs"
        for generation in ("", ".prev"):  # before and after the SuperLink's restart
            supernode_log = (logs / f"supernode{generation}.log").read_text()
            warm_log = (logs / f"warm-start{generation}.log").read_text()
            assert "warm ClientApp start unavailable" not in supernode_log, supernode_log[-3000:]
            assert "ready on" in warm_log and "refused a ClientApp start" not in warm_log, warm_log
