"""Start, inspect and stop a local Flower deployment: one SuperLink, N SuperNodes.

`fedcifar-deploy up` replaces a page of hand-typed `flower-superlink` /
`flower-supernode` commands (ports, certificates, node keys, node configs) with
one command that waits until every process is really connected and, when one
is not, stops what it started and names the log to read. `fedcifar-deploy down`
ends exactly those processes again, by the pids recorded in the state file.

This module manages processes only: it never imports Flower; it runs Flower's
own command line tools, so what it does can be repeated by hand.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_DEPLOY_DIR = ".deploy"
DEFAULT_SUPERLINK_PORTS = (9091, 9092, 9093)  # ServerAppIo, Fleet, Control
DEFAULT_CLIENTAPPIO_BASE_PORT = 9094
DEFAULT_READY_TIMEOUT_S = 60.0
DEFAULT_STOP_GRACE_S = 10.0
# A SuperNode retries a lost SuperLink a few times (exponential back-off, at most
# 20 s apart) and then exits, so nodes never linger after their SuperLink is gone.
DEFAULT_SUPERNODE_MAX_RETRIES = 5
DEFAULT_SUPERNODE_MAX_WAIT_S = 60.0
POLL_INTERVAL_S = 0.1
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")

STATE_FILE_NAME = "state.json"
CONTROL_FEDERATION = "deployment"
# Printed by flower-supernode once the SuperLink has accepted (activated) the node.
SUPERNODE_CONNECTED_MARKER = "SuperNode ID:"


class DeployError(RuntimeError):
    """A failure worth one line to the user: what went wrong and where to look."""


# --------------------------------------------------------------------------- #
# Records
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class SuperLinkPorts:
    """The three SuperLink APIs: ServerAppIo (local), Fleet (nodes), Control (CLI)."""

    serverappio: int
    fleet: int
    control: int

    @classmethod
    def parse(cls, text: str) -> SuperLinkPorts:
        """Read "SERVERAPPIO,FLEET,CONTROL", e.g. "9091,9092,9093"."""
        parts = [part.strip() for part in text.split(",")]
        if len(parts) != 3 or not all(part.isdigit() for part in parts):
            raise argparse.ArgumentTypeError(f"expected three ports SERVERAPPIO,FLEET,CONTROL, got {text!r}")
        ports = [int(part) for part in parts]
        if len(set(ports)) != 3 or not all(0 < port < 65536 for port in ports):
            raise argparse.ArgumentTypeError(f"need three distinct ports, got {text!r}")
        return cls(*ports)


@dataclass(frozen=True)
class TlsFiles:
    """Where the CA certificate and the SuperLink's certificate and key live."""

    ca_certificate: Path
    server_certificate: Path
    server_key: Path


@dataclass
class ManagedProcess:
    """One process started by `up`; enough to find it again and stop it safely."""

    name: str
    pid: int
    # Kernel start time of the pid (Linux): tells our process from a reused pid.
    start_ticks: int | None
    log: str
    command: list[str]
    address: str = ""
    node_config: str = ""


@dataclass
class DeploymentState:
    """What `up` wrote to DIR/state.json, read back by `down` and `status`."""

    directory: str
    started_at: str
    working_directory: str
    tls: bool
    auth: bool
    fleet_address: str
    control_address: str
    serverappio_address: str
    ca_certificate: str = ""
    control_project: str = ""
    processes: list[ManagedProcess] = field(default_factory=list)

    @classmethod
    def from_json(cls, text: str) -> DeploymentState:
        """Rebuild the state from the JSON that `save_state` wrote."""
        raw = json.loads(text)
        raw["processes"] = [ManagedProcess(**entry) for entry in raw.get("processes", [])]
        return cls(**raw)


def state_path(deploy_dir: Path) -> Path:
    """The pid/state file of the deployment in `deploy_dir`."""
    return deploy_dir / STATE_FILE_NAME


def save_state(state: DeploymentState) -> None:
    """Write the state atomically, so a crash mid-write never loses the pids."""
    path = state_path(Path(state.directory))
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(asdict(state), indent=2) + "\n", encoding="utf-8")
    temporary.replace(path)


def load_state(deploy_dir: Path) -> DeploymentState | None:
    """The recorded deployment in `deploy_dir`, or None when nothing was started."""
    path = state_path(deploy_dir)
    if not path.is_file():
        return None
    try:
        return DeploymentState.from_json(path.read_text(encoding="utf-8"))
    except (ValueError, TypeError, KeyError) as err:
        raise DeployError(f"cannot read {path} ({err}); stop its processes by hand") from err


# --------------------------------------------------------------------------- #
# Processes
# --------------------------------------------------------------------------- #
def flower_executable(name: str) -> str:
    """Path of a Flower console script, preferring the running interpreter's env.

    Tests and users often call `.venv/bin/python -m fedcifar_app.deploy` without
    activating the venv; the Flower tools must still come from that venv.
    """
    beside_python = Path(sys.executable).parent / name
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    found = shutil.which(name)
    if found is None:
        raise DeployError(f"`{name}` not found; install flwr in this environment")
    return found


def child_environment(flower_home: Path) -> dict[str, str]:
    """Environment for Flower processes.

    PATH leads with this interpreter's bin folder because SuperLink and SuperNode
    launch `flower-superexec` by name. FLWR_HOME gives each process its own app
    and file store, so two nodes never install the same app into one folder at once.
    """
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["FLWR_HOME"] = str(flower_home)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def read_proc_stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, process group, session, start ticks) of `pid` from /proc, or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8")
    except OSError:
        return None
    # The command name sits in parentheses and may hold spaces: split after it.
    fields = text.rsplit(")", 1)[1].split()
    return fields[0], int(fields[2]), int(fields[3]), int(fields[19])


def process_start_ticks(pid: int) -> int | None:
    """Kernel start time of `pid`, to recognise it later; None off Linux."""
    stat = read_proc_stat(pid)
    return stat[3] if stat else None


def live_session_members(record: ManagedProcess) -> list[int]:
    """Pids still alive in the session that `record`'s process leads.

    Each process was started in its own session, so its session id is its pid and
    every Flower child it spawned (superexec, ServerApp, ClientApps) shares it.
    A pid now held by an unrelated process (different start time) counts as gone.
    """
    leader = read_proc_stat(record.pid)
    if leader is not None and record.start_ticks is not None:
        if leader[0] != "Z" and leader[3] != record.start_ticks:
            return []
    if not Path("/proc").is_dir():  # not Linux: ask the kernel about the group
        try:
            os.killpg(record.pid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [record.pid]
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = read_proc_stat(int(entry.name))
            if stat and stat[2] == record.pid and stat[0] != "Z":
                members.append(int(entry.name))
    return members


def start_process(
    name: str, command: list[str], log_path: Path, cwd: Path, env: dict[str, str]
) -> subprocess.Popen[bytes]:
    """Start `command` in its own session, output to `log_path`.

    Its own session (and so its own process group) lets `down` end the process
    together with the children Flower spawns, and keeps Ctrl-C in the terminal
    that ran `up` from reaching the deployment.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if log_path.exists():  # keep the previous log one generation, for post-mortems
        log_path.replace(log_path.with_suffix(".prev.log"))
    with log_path.open("wb") as log_file:
        log_file.write(f"# {name}: {' '.join(command)}\n".encode())
        log_file.flush()
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )


def signal_session(record: ManagedProcess, signum: int) -> None:
    """Send `signum` to the process group of `record` (pgid == pid, see start_process)."""
    try:
        os.killpg(record.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def stop_processes(records: Sequence[ManagedProcess], grace_s: float) -> list[str]:
    """End `records` and their children: SIGTERM, then SIGKILL after `grace_s`.

    Returns the names of processes that were still alive and had to be killed.
    """
    running = [record for record in records if live_session_members(record)]
    for record in running:
        signal_session(record, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while running and time.monotonic() < deadline:
        _reap(running)
        running = [record for record in running if live_session_members(record)]
        if running:
            time.sleep(POLL_INTERVAL_S)
    for record in running:
        signal_session(record, signal.SIGKILL)
    kill_deadline = time.monotonic() + 5.0
    while time.monotonic() < kill_deadline and any(live_session_members(record) for record in running):
        _reap(running)
        time.sleep(POLL_INTERVAL_S)
    return [record.name for record in running]


def _reap(records: Sequence[ManagedProcess]) -> None:
    """Collect those of `records` that are exited children of this process.

    Only our own pids: waiting on any child would steal exit codes from other
    `subprocess.Popen` objects of a caller (such as a test).
    """
    for record in records:
        try:
            os.waitpid(record.pid, os.WNOHANG)
        except ChildProcessError:
            pass


def log_hint(log_path: Path) -> str:
    """The likeliest error message at the end of a log, on one short line.

    Flower ends a failed process with "Exit Code: N", its message, and a link;
    the code and message are what the user needs, not the link.
    """
    try:
        text = log_path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    lines = [ANSI_ESCAPE.sub("", line).strip() for line in text.splitlines()[-40:]]
    lines = [line for line in lines if line and not line.startswith("For more information")]
    if not lines:
        return ""
    hint = lines[-1]
    for index in range(len(lines) - 1, -1, -1):
        if "Exit Code:" in lines[index]:
            code = lines[index].split("Exit Code:", 1)[1].strip()
            message = lines[index + 1] if index + 1 < len(lines) else ""
            hint = f"Flower exit code {code}: {message}".strip()
            break
    return hint if len(hint) <= 200 else hint[:197] + "..."


@dataclass
class ReadinessCheck:
    """A started process and the condition that means it is up."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    is_ready: Callable[[], bool]
    what: str  # the condition in words, for the error message


def wait_until_ready(checks: Sequence[ReadinessCheck], timeout_s: float) -> None:
    """Poll every check until all hold; fail at once if a process dies, or at timeout.

    All processes share one deadline, so N SuperNodes come up in parallel.
    """
    deadline = time.monotonic() + timeout_s
    pending = list(checks)
    while pending:
        for check in list(pending):
            exit_code = check.process.poll()
            if exit_code is not None:
                hint = log_hint(check.log_path)
                raise DeployError(
                    f"{check.name} exited with code {exit_code} before {check.what}; "
                    f"read {check.log_path}" + (f" (log says: {hint})" if hint else "")
                )
            if check.is_ready():
                pending.remove(check)
        if pending and time.monotonic() > deadline:
            check = pending[0]
            raise DeployError(
                f"{check.name} did not come up ({check.what}) within {timeout_s:g} s; read {check.log_path}"
            )
        if pending:
            time.sleep(POLL_INTERVAL_S)


def port_accepts(host: str, port: int) -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def check_ports_free(host: str, ports: Sequence[int]) -> None:
    """Fail before starting anything if a port is taken.

    gRPC servers bind with SO_REUSEPORT, so a second SuperLink on a busy port
    would start "fine" and share the traffic; a bind without SO_REUSEPORT here
    notices. SO_REUSEADDR keeps closed connections (TIME_WAIT) from counting.
    """
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as err:
                raise DeployError(
                    f"port {host}:{port} is already in use ({err.strerror}); stop what holds it or choose other ports"
                ) from err


def log_contains(log_path: Path, marker: str) -> bool:
    """True once `marker` appears in the log."""
    try:
        return marker in log_path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False


# --------------------------------------------------------------------------- #
# TLS certificates and SuperNode keys
# --------------------------------------------------------------------------- #
def certificate_names(listen_host: str, extra_names: Sequence[str]) -> list[str]:
    """Host names and IPs the SuperLink certificate must cover: loopback, the
    address it listens on (unless all interfaces), and the extra names."""
    names = ["localhost", "127.0.0.1"]
    specific_host = [listen_host] if listen_host not in ("0.0.0.0", "") else []
    for name in [*specific_host, *extra_names]:
        if name not in names:
            names.append(name)
    return names


def _subject_alternative_names(names: Sequence[str]) -> list[x509.GeneralName]:
    """IP addresses as IP entries (clients match IPs only against those), the rest as DNS."""
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return entries


def _certificate_covers(certificate_path: Path, names: Sequence[str]) -> bool:
    """True if the certificate exists, names all of `names`, and is valid past tomorrow."""
    try:
        certificate = x509.load_pem_x509_certificate(certificate_path.read_bytes())
        covered = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return False
    expires = getattr(certificate, "not_valid_after_utc", None)  # cryptography >= 42
    if expires is None:
        expires = certificate.not_valid_after.replace(tzinfo=datetime.timezone.utc)
    now = datetime.datetime.now(datetime.timezone.utc)
    not_expired = expires > now + datetime.timedelta(days=1)
    return not_expired and all(entry in covered for entry in _subject_alternative_names(names))


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret readable by its owner only."""
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_bytes(data)


def ensure_tls_files(cert_dir: Path, names: Sequence[str], valid_days: int = 365) -> TlsFiles:
    """A CA and a CA-signed SuperLink certificate whose SAN covers `names`.

    Existing files are kept while they still cover `names`, so a CA already
    copied to other machines stays valid across `down`/`up`. The CA's own key is
    never written: new certificates mean a new CA.
    """
    files = TlsFiles(
        ca_certificate=cert_dir / "ca.crt",
        server_certificate=cert_dir / "server.pem",
        server_key=cert_dir / "server.key",
    )
    if files.ca_certificate.is_file() and files.server_key.is_file():
        if _certificate_covers(files.server_certificate, names):
            return files

    cert_dir.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    not_before = now - datetime.timedelta(minutes=5)
    not_after = now + datetime.timedelta(days=valid_days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedcifar deployment CA")])
    ca_certificate = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP384R1())
    server_certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(_subject_alternative_names(names)), False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )

    files.ca_certificate.write_bytes(ca_certificate.public_bytes(serialization.Encoding.PEM))
    files.server_certificate.write_bytes(server_certificate.public_bytes(serialization.Encoding.PEM))
    _write_private(
        files.server_key,
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    return files


def ensure_node_key(key_dir: Path, name: str) -> tuple[Path, Path]:
    """An ECDSA P-384 key pair in OpenSSH format, as `flower-supernode` reads it.

    Same format as `ssh-keygen -t ecdsa -b 384 -N "" -f KEY`; kept across `up`s
    so a node keeps its identity. Returns (private key, public key).
    """
    private_path = key_dir / name
    public_path = key_dir / f"{name}.pub"
    if private_path.is_file() and public_path.is_file():
        return private_path, public_path
    key_dir.mkdir(parents=True, exist_ok=True)
    private_key = ec.generate_private_key(ec.SECP384R1())
    _write_private(
        private_path,
        private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    public_line = private_key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    public_path.write_bytes(public_line + f" {name}\n".encode())
    return private_path, public_path


# --------------------------------------------------------------------------- #
# Talking to the SuperLink with the `flwr` CLI
# --------------------------------------------------------------------------- #
def write_control_project(project_dir: Path, control_address: str, ca_certificate: Path | None) -> Path:
    """A minimal Flower project whose one federation is exactly this SuperLink.

    `flwr supernode register` takes its address and CA from a pyproject.toml and
    has no `--federation-config`; this keeps registration independent of the
    ports and paths in the app's own pyproject.toml.
    """
    project_dir.mkdir(parents=True, exist_ok=True)
    if ca_certificate is None:
        security = "insecure = true"
    else:
        security = f"root-certificates = {json.dumps(str(ca_certificate.resolve()))}"
    (project_dir / "pyproject.toml").write_text(
        "# Written by fedcifar-deploy: lets `flwr supernode register|list` reach\n"
        "# the SuperLink of this deployment. Not an app; do not `flwr run` it.\n"
        "[project]\n"
        'name = "fedcifar-deploy-control"\n'
        'version = "1.0.0"\n'
        'description = "Control-API settings of a local deployment"\n'
        'license = "Apache-2.0"\n'
        'authors = [{ name = "fedcifar-deploy" }]\n\n'
        "[tool.flwr.app]\n"
        'publisher = "fedcifar"\n\n'
        "[tool.flwr.app.components]\n"
        'serverapp = "fedcifar_app.server_app:app"\n'
        'clientapp = "fedcifar_app.client_app:app"\n\n'
        "[tool.flwr.federations]\n"
        f'default = "{CONTROL_FEDERATION}"\n\n'
        f"[tool.flwr.federations.{CONTROL_FEDERATION}]\n"
        f'address = "{control_address}"\n'
        f"{security}\n",
        encoding="utf-8",
    )
    return project_dir


def _json_from_cli_output(text: str) -> dict | None:
    """The JSON object the `flwr` CLI printed with --format json, if any."""
    start = text.find("{")
    if start < 0:
        return None
    try:
        value = json.loads(text[start:])
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def register_node_keys(
    public_keys: Sequence[Path], control_project: Path, env: dict[str, str], timeout_s: float
) -> list[str]:
    """Register SuperNode public keys with the SuperLink (in parallel); their node ids.

    `flwr supernode register` exits 0 even when it fails (1.25 prints the error
    and returns), so success is read from its JSON answer.
    """
    registrations = []
    for public_key in public_keys:
        command = [
            flower_executable("flwr"),
            "supernode",
            "register",
            str(public_key),
            str(control_project),
            CONTROL_FEDERATION,
            "--format",
            "json",
        ]
        registrations.append(
            (
                public_key,
                subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    env=env,
                ),
            )
        )
    deadline = time.monotonic() + timeout_s
    node_ids, failure = [], None
    for public_key, process in registrations:
        try:
            stdout, stderr = process.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            failure = failure or f"`flwr supernode register {public_key}` did not answer in {timeout_s:g} s"
            continue
        answer = _json_from_cli_output(stdout)
        if answer and answer.get("success"):
            node_ids.append(str(answer.get("node-id", "")))
            continue
        detail = (answer or {}).get("error-message") or (stdout + stderr)
        detail = " ".join(ANSI_ESCAPE.sub("", str(detail)).split())[:300]
        failure = failure or f"registering {public_key} with the SuperLink failed: {detail}"
    if failure:
        raise DeployError(failure)
    return node_ids


# --------------------------------------------------------------------------- #
# Commands for the Flower processes
# --------------------------------------------------------------------------- #
def superlink_command(ports: SuperLinkPorts, host: str, tls: TlsFiles | None, enable_auth: bool) -> list[str]:
    """`flower-superlink` arguments; ServerAppIo stays on loopback (it has no TLS)."""
    command = [
        flower_executable("flower-superlink"),
        "--serverappio-api-address",
        f"127.0.0.1:{ports.serverappio}",
        "--fleet-api-address",
        f"{host}:{ports.fleet}",
        "--control-api-address",
        f"{host}:{ports.control}",
    ]
    if tls is None:
        command.append("--insecure")
    else:
        command += [
            "--ssl-ca-certfile",
            str(tls.ca_certificate),
            "--ssl-certfile",
            str(tls.server_certificate),
            "--ssl-keyfile",
            str(tls.server_key),
        ]
    if enable_auth:
        command.append("--enable-supernode-auth")
    return command


def supernode_command(
    fleet_address: str,
    clientappio_address: str,
    node_config: str,
    root_certificates: Path | None,
    private_key: Path | None = None,
    max_retries: int | None = DEFAULT_SUPERNODE_MAX_RETRIES,
    max_wait_s: float | None = DEFAULT_SUPERNODE_MAX_WAIT_S,
    insecure: bool | None = None,
) -> list[str]:
    """`flower-supernode` arguments.

    `insecure` defaults to "no CA given"; pass False with no CA to get a node
    that tries TLS against the system trust store (used to show it is refused).
    """
    command = [
        flower_executable("flower-supernode"),
        "--superlink",
        fleet_address,
        "--clientappio-api-address",
        clientappio_address,
    ]
    if insecure is None:
        insecure = root_certificates is None
    if insecure:
        command.append("--insecure")
    if root_certificates is not None:
        command += ["--root-certificates", str(root_certificates)]
    if private_key is not None:
        command += ["--auth-supernode-private-key", str(private_key)]
    if max_retries is not None:
        command += ["--max-retries", str(max_retries)]
    if max_wait_s is not None:
        command += ["--max-wait-time", str(max_wait_s)]
    if node_config:
        command += ["--node-config", node_config]
    return command


def data_path_node_config(path: Path) -> str:
    """`data-path='/abs/folder'` in the TOML-ish syntax of --node-config."""
    text = str(path.resolve())
    if "'" not in text:
        return f"data-path='{text}'"
    if '"' not in text and "\\" not in text:
        return f'data-path="{text}"'
    raise DeployError(f"--data-path {text!r}: a path with both quote kinds cannot be passed")


def node_configs(num_nodes: int, explicit: Sequence[str] | None, data_paths: Sequence[str] | None) -> list[str]:
    """One --node-config string per SuperNode.

    Default: `partition-id=i num-partitions=N`. `--data-path` gives a node its own
    folder instead; an explicit `--node-config` is used as written (and joined
    with its data path when both are given).
    """
    explicit = list(explicit or [])
    data_paths = list(data_paths or [])
    for flag, values in (("--node-config", explicit), ("--data-path", data_paths)):
        if values and len(values) != num_nodes:
            raise DeployError(f"{flag} given {len(values)}x for --nodes {num_nodes}; give it once per node")
    configs = []
    for index in range(num_nodes):
        parts = []
        if explicit:
            parts.append(explicit[index].strip())
        if data_paths:
            folder = Path(data_paths[index]).expanduser()
            if not folder.is_dir():
                raise DeployError(f"--data-path {folder} is not a folder")
            parts.append(data_path_node_config(folder))
        if not parts:
            parts.append(f"partition-id={index} num-partitions={num_nodes}")
        configs.append(" ".join(part for part in parts if part))
    return configs


# --------------------------------------------------------------------------- #
# up / down / status
# --------------------------------------------------------------------------- #
def deployment_is_running(state: DeploymentState) -> bool:
    """True while any recorded process (or a child of it) is alive."""
    return any(live_session_members(record) for record in state.processes)


@dataclass
class Launcher:
    """Starts processes for one `up` and records each in the state file at once,
    so `down` can end it even if `up` itself dies a moment later."""

    state: DeploymentState
    logs: Path
    working_directory: Path
    started: list[ManagedProcess] = field(default_factory=list)

    def launch(
        self,
        name: str,
        command: list[str],
        env: dict[str, str],
        address: str,
        node_config: str = "",
    ) -> subprocess.Popen[bytes]:
        """Start `command` as `name`, logging to logs/<name>.log."""
        log_path = self.logs / f"{name}.log"
        process = start_process(name, command, log_path, self.working_directory, env)
        self.started.append(
            ManagedProcess(
                name=name,
                pid=process.pid,
                start_ticks=process_start_ticks(process.pid),
                log=str(log_path),
                command=command,
                address=address,
                node_config=node_config,
            )
        )
        self.state.processes = list(self.started)
        save_state(self.state)
        return process


def start_superlink(
    launcher: Launcher,
    ports: SuperLinkPorts,
    host: str,
    tls: TlsFiles | None,
    enable_auth: bool,
    env: dict[str, str],
    timeout_s: float,
) -> None:
    """Start the SuperLink and wait until its three APIs accept connections."""
    state = launcher.state
    process = launcher.launch(
        "superlink",
        superlink_command(ports, host, tls, enable_auth),
        env,
        address=f"Fleet {state.fleet_address}, Control {state.control_address}",
    )
    endpoints = [state.serverappio_address, state.fleet_address, state.control_address]

    def all_ports_accept() -> bool:
        return all(port_accepts(*split_address(endpoint)) for endpoint in endpoints)

    wait_until_ready(
        [
            ReadinessCheck(
                "superlink",
                process,
                launcher.logs / "superlink.log",
                all_ports_accept,
                f"ports {ports.serverappio}, {ports.fleet}, {ports.control} accepting connections",
            )
        ],
        timeout_s,
    )


def start_supernodes(
    launcher: Launcher,
    node_configs_: Sequence[str],
    clientappio_ports: Sequence[int],
    tls: TlsFiles | None,
    private_keys: Sequence[Path | None],
    args: argparse.Namespace,
) -> None:
    """Start all SuperNodes, then wait until each one is accepted by the SuperLink."""
    checks = []
    for index, (config, port, private_key) in enumerate(
        zip(node_configs_, clientappio_ports, private_keys, strict=True)
    ):
        name = f"supernode-{index}"
        command = supernode_command(
            launcher.state.fleet_address,
            f"127.0.0.1:{port}",
            config,
            tls.ca_certificate if tls else None,
            private_key,
            args.supernode_max_retries,
            args.supernode_max_wait_time,
        )
        flower_home = Path(launcher.state.directory) / "flwr-home" / name
        process = launcher.launch(
            name,
            command,
            child_environment(flower_home),
            address=f"ClientAppIo 127.0.0.1:{port}",
            node_config=config,
        )
        log_path = launcher.logs / f"{name}.log"
        checks.append(
            ReadinessCheck(
                name,
                process,
                log_path,
                lambda log_path=log_path, port=port: (
                    log_contains(log_path, SUPERNODE_CONNECTED_MARKER) and port_accepts("127.0.0.1", port)
                ),
                "connecting to the SuperLink",
            )
        )
    wait_until_ready(checks, args.ready_timeout)


def split_address(address: str) -> tuple[str, int]:
    """ "host:port" -> (host, port)."""
    host, _, port = address.rpartition(":")
    return host, int(port)


def bring_up(args: argparse.Namespace) -> DeploymentState:
    """Start SuperLink and SuperNodes; on any failure stop them all and raise."""
    if args.auth and not args.tls:
        raise DeployError("--auth needs --tls: Flower allows SuperNode authentication only over TLS")
    if args.nodes < 0:
        raise DeployError("--nodes must be 0 or more")
    configs = node_configs(args.nodes, args.node_config, args.data_path)
    deploy_dir = Path(args.dir).expanduser().resolve()
    previous = load_state(deploy_dir)
    if previous is not None and deployment_is_running(previous):
        raise DeployError(
            f"a deployment from {deploy_dir} is still running; run `fedcifar-deploy down --dir {args.dir}` first"
        )
    ports: SuperLinkPorts = args.superlink_ports
    clientappio_ports = [args.clientappio_base_port + index for index in range(args.nodes)]
    clashes = set(clientappio_ports) & {ports.serverappio, ports.fleet, ports.control}
    if clashes:
        raise DeployError(f"ClientAppIo ports {sorted(clashes)} collide with SuperLink ports")
    check_ports_free("127.0.0.1", [ports.serverappio, *clientappio_ports])
    check_ports_free(args.host, [ports.fleet, ports.control])

    # Fleet and Control may listen on all interfaces; this machine reaches them on loopback.
    reachable_host = "127.0.0.1" if args.host in ("0.0.0.0", "") else args.host
    deploy_dir.mkdir(parents=True, exist_ok=True)
    tls = ensure_tls_files(deploy_dir / "certs", certificate_names(args.host, args.tls_san)) if args.tls else None
    state = DeploymentState(
        directory=str(deploy_dir),
        started_at=datetime.datetime.now().isoformat(timespec="seconds"),
        working_directory=str(Path.cwd()),
        tls=bool(args.tls),
        auth=bool(args.auth),
        fleet_address=f"{reachable_host}:{ports.fleet}",
        control_address=f"{reachable_host}:{ports.control}",
        serverappio_address=f"127.0.0.1:{ports.serverappio}",
        ca_certificate=str(tls.ca_certificate) if tls else "",
    )
    launcher = Launcher(state, deploy_dir / "logs", Path.cwd())
    superlink_env = child_environment(deploy_dir / "flwr-home" / "superlink")
    try:
        start_superlink(launcher, ports, args.host, tls, args.auth, superlink_env, args.ready_timeout)
        control_project = write_control_project(
            deploy_dir / "control", state.control_address, tls.ca_certificate if tls else None
        )
        state.control_project = str(control_project)
        save_state(state)

        private_keys: list[Path | None] = [None] * args.nodes
        if args.auth:
            key_pairs = [ensure_node_key(deploy_dir / "keys", f"supernode-{index}") for index in range(args.nodes)]
            private_keys = [private for private, _ in key_pairs]
            # Registered before the SuperNodes start: the SuperLink refuses unknown keys.
            register_node_keys(
                [public for _, public in key_pairs],
                control_project,
                superlink_env,
                args.ready_timeout,
            )
        start_supernodes(launcher, configs, clientappio_ports, tls, private_keys, args)
    except BaseException:
        stop_processes(list(reversed(launcher.started)), args.stop_grace)
        state_path(deploy_dir).unlink(missing_ok=True)
        raise
    return state


def suggested_run_command(state: DeploymentState, app_dir: Path) -> str:
    """The `flwr run` line that reaches this deployment from `app_dir`."""
    federation = "local-deployment-tls" if state.tls else "local-deployment"
    overrides = []
    if state.control_address != "127.0.0.1:9093":
        overrides.append(f"address='{state.control_address}'")
    if state.tls:
        default_ca = (app_dir / DEFAULT_DEPLOY_DIR / "certs" / "ca.crt").resolve()
        if Path(state.ca_certificate).resolve() != default_ca:
            overrides.append(f"root-certificates='{state.ca_certificate}'")
    command = f"flwr run . {federation} --stream"
    if overrides:
        command += f' --federation-config "{" ".join(overrides)}"'
    return command


def describe(state: DeploymentState) -> str:
    """Human summary of a deployment: processes, addresses, logs, security, cwd."""
    lines = []
    for record in state.processes:
        alive = "running" if live_session_members(record) else "stopped"
        extra = f"  node-config: {record.node_config}" if record.node_config else ""
        lines.append(
            f"{record.name:<12} pid {record.pid:<7} {alive:<8} {record.address}{extra}\n{'':<12} log {record.log}"
        )
    security = "TLS" if state.tls else "insecure (no TLS)"
    if state.auth:
        security += " + SuperNode authentication"
    lines.append(f"security: {security}" + (f", CA {state.ca_certificate}" if state.tls else ""))
    lines.append(f"ServerApp working directory: {state.working_directory} (a relative output-dir lands here)")
    return "\n".join(lines)


def command_up(args: argparse.Namespace) -> int:
    """`up`: start everything, print where it is and how to use it."""
    state = bring_up(args)
    print(describe(state))
    print(f"run (in the app folder): {suggested_run_command(state, Path.cwd())}")
    print(f"stop: fedcifar-deploy down --dir {args.dir}")
    return 0


def command_down(args: argparse.Namespace) -> int:
    """`down`: end the recorded processes (SuperNodes first), drop the state, keep logs."""
    deploy_dir = Path(args.dir).expanduser().resolve()
    state = load_state(deploy_dir)
    if state is None:
        print(f"nothing to stop: no {STATE_FILE_NAME} in {deploy_dir}")
        return 0
    supernodes = [record for record in state.processes if record.name != "superlink"]
    superlinks = [record for record in state.processes if record.name == "superlink"]
    # Nodes first, so they leave the SuperLink cleanly instead of retrying it.
    killed = stop_processes(supernodes, args.stop_grace)
    killed += stop_processes(superlinks, args.stop_grace)
    leftovers = [record.name for record in state.processes if live_session_members(record)]
    if leftovers:
        raise DeployError(f"could not stop {', '.join(leftovers)}; state kept in {deploy_dir}")
    state_path(deploy_dir).unlink(missing_ok=True)
    names = ", ".join(record.name for record in state.processes) or "nothing"
    note = f" (killed after {args.stop_grace:.0f} s: {', '.join(killed)})" if killed else ""
    print(f"stopped {names}{note}; logs kept in {deploy_dir / 'logs'}")
    return 0


def command_status(args: argparse.Namespace) -> int:
    """`status`: what is recorded and whether it still runs; exit 1 if anything died."""
    deploy_dir = Path(args.dir).expanduser().resolve()
    state = load_state(deploy_dir)
    if state is None:
        print(f"no deployment recorded in {deploy_dir}")
        return 1
    print(f"deployment in {deploy_dir}, started {state.started_at}")
    print(describe(state))
    all_running = all(live_session_members(record) for record in state.processes)
    return 0 if all_running else 1


# --------------------------------------------------------------------------- #
# Command line
# --------------------------------------------------------------------------- #
def build_parser() -> argparse.ArgumentParser:
    """The `fedcifar-deploy` command line."""
    parser = argparse.ArgumentParser(
        prog="fedcifar-deploy",
        description="Start and stop a local Flower deployment (SuperLink + SuperNodes).",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def add_dir(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--dir",
            default=DEFAULT_DEPLOY_DIR,
            help=f"folder for logs, certificates, keys and the pid file (default: {DEFAULT_DEPLOY_DIR})",
        )
        sub.add_argument(
            "--stop-grace",
            type=float,
            default=DEFAULT_STOP_GRACE_S,
            help="seconds between SIGTERM and SIGKILL when stopping (default: %(default)s)",
        )

    up = commands.add_parser("up", help="start a SuperLink and N SuperNodes")
    add_dir(up)
    up.add_argument("--nodes", type=int, default=2, help="number of SuperNodes (default: 2)")
    up.add_argument("--tls", action="store_true", help="TLS with a generated CA (DIR/certs)")
    up.add_argument(
        "--auth",
        action="store_true",
        help="SuperNode authentication: a registered P-384 key per node (needs --tls)",
    )
    up.add_argument(
        "--superlink-ports",
        type=SuperLinkPorts.parse,
        default=SuperLinkPorts(*DEFAULT_SUPERLINK_PORTS),
        metavar="SERVERAPPIO,FLEET,CONTROL",
        help="SuperLink ports (default: 9091,9092,9093)",
    )
    up.add_argument(
        "--clientappio-base-port",
        type=int,
        default=DEFAULT_CLIENTAPPIO_BASE_PORT,
        help="ClientAppIo port of the first SuperNode; the next ones count up (default: 9094)",
    )
    up.add_argument(
        "--node-config",
        action="append",
        metavar='"k=v ..."',
        help="node config of one SuperNode; give once per node (default: partition-id=i num-partitions=N)",
    )
    up.add_argument(
        "--data-path",
        action="append",
        metavar="FOLDER",
        help="a SuperNode's own data folder, node config data-path=FOLDER; once per node",
    )
    up.add_argument(
        "--host",
        default="127.0.0.1",
        help="address the Fleet and Control APIs listen on; 0.0.0.0 to accept other machines (default: 127.0.0.1)",
    )
    up.add_argument(
        "--tls-san",
        action="append",
        default=[],
        metavar="NAME",
        help="extra host name or IP for the SuperLink certificate (repeatable)",
    )
    up.add_argument(
        "--ready-timeout",
        type=float,
        default=DEFAULT_READY_TIMEOUT_S,
        help="seconds the SuperLink, then all SuperNodes together, may take to come up (default: %(default)s)",
    )
    up.add_argument(
        "--supernode-max-retries",
        type=int,
        default=DEFAULT_SUPERNODE_MAX_RETRIES,
        help="reconnection attempts before a SuperNode gives up (default: %(default)s)",
    )
    up.add_argument(
        "--supernode-max-wait-time",
        type=float,
        default=DEFAULT_SUPERNODE_MAX_WAIT_S,
        help="seconds a SuperNode keeps reconnecting before it gives up (default: %(default)s)",
    )
    up.set_defaults(handler=command_up)

    down = commands.add_parser("down", help="stop the processes that `up` started")
    add_dir(down)
    down.set_defaults(handler=command_down)

    status = commands.add_parser("status", help="show the recorded processes")
    add_dir(status)
    status.set_defaults(handler=command_status)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `fedcifar-deploy` and `python -m fedcifar_app.deploy`."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except DeployError as err:
        print(f"fedcifar-deploy: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fedcifar-deploy: interrupted; stopped what was started", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
