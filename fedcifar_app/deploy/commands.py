"""The command lines of the Flower processes and the node configs they get.

Pure functions: the same inputs give the same argv, so what `up` runs can be
printed, tested and typed by hand.
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..client.threads import THREAD_ENV_VARS, threads_per_process
from ..errors import DeployError
from .certificates import TlsFiles
from .processes import flower_executable

DEFAULT_SUPERLINK_PORTS = (9091, 9092, 9093)  # ServerAppIo, Fleet, Control
DEFAULT_CLIENTAPPIO_BASE_PORT = 9094
# A SuperNode retries a lost SuperLink a few times (exponential back-off, at most
# 20 s apart) and then exits, so nodes never linger after their SuperLink is gone.
DEFAULT_SUPERNODE_MAX_RETRIES = 5
DEFAULT_SUPERNODE_MAX_WAIT_S = 60.0
# Printed by flower-supernode once the SuperLink has accepted (activated) the node.
SUPERNODE_CONNECTED_MARKER = "SuperNode ID:"
# flwr 1.35 replaced the SuperNode's gRPC ClientAppIo API (--clientappio-api-address HOST:PORT) by an
# HTTP Runtime API (--host HOST --port PORT) and refuses the old flag (read in the 1.30-1.42 wheels).
RUNTIME_API_FLWR = (1, 35)


def installed_flwr_version() -> tuple[int, ...]:
    """The flwr release installed beside this interpreter, from its metadata (Flower is not imported)."""
    try:
        text = importlib.metadata.version("flwr")
    except importlib.metadata.PackageNotFoundError as err:
        raise DeployError("flwr is not installed in this environment; pip install the app first") from err
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def clientappio_flags(address: str, flwr_version: tuple[int, ...]) -> list[str]:
    """Where the SuperNode serves its ClientApps: `--clientappio-api-address` before 1.35, `--host/--port` since."""
    if flwr_version < RUNTIME_API_FLWR:
        return ["--clientappio-api-address", address]
    host, _, port = address.rpartition(":")
    return ["--host", host.strip("[]"), "--port", port]


@dataclass(frozen=True)
class SuperLinkPorts:
    """The three SuperLink APIs: ServerAppIo (local), Fleet (nodes), Control (CLI)."""

    serverappio: int
    fleet: int
    control: int

    @classmethod
    def parse(cls, text: str) -> SuperLinkPorts:
        """Read "SERVERAPPIO,FLEET,CONTROL", e.g. "9091,9092,9093"; ValueError names what is wrong."""
        parts = [part.strip() for part in text.split(",")]
        if len(parts) != 3 or not all(part.isdigit() for part in parts):
            raise ValueError(f"expected three ports SERVERAPPIO,FLEET,CONTROL, got {text!r}")
        ports = [int(part) for part in parts]
        if len(set(ports)) != 3 or not all(0 < port < 65536 for port in ports):
            raise ValueError(f"need three distinct ports in 1..65535, got {text!r}")
        return cls(*ports)

    def as_tuple(self) -> tuple[int, int, int]:
        return (self.serverappio, self.fleet, self.control)


def supernode_thread_environment(cores: int, concurrent_clientapps: int) -> dict[str, str]:
    """Environment that caps each ClientApp's OpenMP/MKL threads at its share of the cores.

    A SuperNode's `flwr-clientapp` processes inherit it; torch reads it at import.
    Without it each of N ClientApps spins one thread per core, N x cores on `cores`.
    """
    threads = str(threads_per_process(cores, concurrent_clientapps))
    return {name: threads for name in THREAD_ENV_VARS}


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
    flwr_version: tuple[int, ...] | None = None,
) -> list[str]:
    """`flower-supernode` arguments.

    `insecure` defaults to "no CA given"; pass False with no CA to get a node
    that tries TLS against the system trust store (used to show it is refused).
    `flwr_version` defaults to the installed Flower's; it decides how the ClientApp API is given.
    """
    command = [
        flower_executable("flower-supernode"),
        "--superlink",
        fleet_address,
        *clientappio_flags(clientappio_address, flwr_version or installed_flwr_version()),
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


def warm_parent_command(folder: Path, supernode_pids: Sequence[int]) -> list[str]:
    """`fedcifar-warm` serving the SuperNodes `supernode_pids` from `folder` until they have all ended."""
    command = [flower_executable("fedcifar-warm"), "--dir", str(folder)]
    for pid in supernode_pids:
        command += ["--exit-with", str(pid)]
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
