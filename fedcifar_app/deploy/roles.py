"""One machine's part of a deployment across hosts: a SuperNode, a node key, a registration.

`up` runs everything on one machine; across machines each host runs one role, built on
the same pieces (commands, processes, state file, preflight), so `status` and `down`
work on every host alike. Every role prints the plain Flower command it runs.
"""

from __future__ import annotations

import datetime
import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import DeployError
from .certificates import ensure_node_key
from .commands import SUPERNODE_CONNECTED_MARKER, supernode_command
from .flwr_cli import register_node_keys, write_control_project
from .orchestration import (
    Launcher,
    deployment_is_running,
    prepare_warm_start,
    registered_keys_dir,
    start_warm_parent,
)
from .preflight import check_superlink
from .processes import (
    ReadinessCheck,
    check_ports_free,
    child_environment,
    log_contains,
    port_accepts,
    stop_processes,
    wait_until_ready,
)
from .state import DeploymentState, load_state, state_path


@dataclass(frozen=True)
class SuperNodeOptions:
    """One SuperNode on this machine, connecting to a SuperLink elsewhere."""

    directory: Path
    superlink: str  # the SuperLink's Fleet address, HOST:PORT
    node_config: str
    ca_certificate: Path | None = None  # None: --insecure
    private_key: Path | None = None  # with SuperNode authentication
    clientappio_port: int = 9094
    ready_timeout_s: float = 60.0
    stop_grace_s: float = 10.0
    max_retries: int | None = None  # None: Flower's default, reconnect forever
    max_wait_s: float | None = None
    warm: bool = True  # ClientApp processes fork from a warm parent (fedcifar-warm); False: --cold

    def __post_init__(self) -> None:
        if not self.node_config.strip():
            raise DeployError(
                '--node-config is empty: give "data-path=\'/data/site-a\'" or "partition-id=0 num-partitions=3"'
            )
        if self.private_key is not None and self.ca_certificate is None:
            raise DeployError("--key needs --ca: Flower allows SuperNode authentication only over TLS")
        if self.private_key is not None and not self.private_key.is_file():
            raise DeployError(f"--key {self.private_key} not found: make one with `fedcifar-deploy key`")


def start_supernode(options: SuperNodeOptions) -> DeploymentState:
    """Check the SuperLink is reachable, start the SuperNode, wait until the SuperLink accepts it."""
    deploy_dir = options.directory.expanduser().resolve()
    previous = load_state(deploy_dir)
    if previous is not None and deployment_is_running(previous):
        raise DeployError(f"{deploy_dir} already runs processes; run `fedcifar-deploy down --dir {deploy_dir}` first")
    check_superlink(options.superlink, options.ca_certificate)
    check_ports_free("127.0.0.1", [options.clientappio_port])
    deploy_dir.mkdir(parents=True, exist_ok=True)
    ca = options.ca_certificate.resolve() if options.ca_certificate else None
    state = DeploymentState(
        directory=str(deploy_dir),
        started_at=datetime.datetime.now().isoformat(timespec="seconds"),
        working_directory=str(Path.cwd()),
        tls=ca is not None,
        auth=options.private_key is not None,
        fleet_address=options.superlink,
        control_address="",
        serverappio_address="",
        ca_certificate=str(ca or ""),
    )
    launcher = Launcher(state, deploy_dir / "logs", Path.cwd())
    clientappio = f"127.0.0.1:{options.clientappio_port}"
    key = options.private_key.resolve() if options.private_key else None
    command = supernode_command(
        options.superlink, clientappio, options.node_config, ca, key, options.max_retries, options.max_wait_s
    )
    print("running:", " ".join(command))
    try:
        homes = deploy_dir / "flwr-home"
        warm = prepare_warm_start(state) if options.warm else None
        env = child_environment(homes / "supernode")
        if warm is not None:
            env = warm.environment(env)
            print("with the warm ClientApp start: by hand that is `fedcifar-warm` before the command above")
        process = launcher.launch("supernode", command, env, f"ClientAppIo {clientappio}", options.node_config)
        log_path = launcher.logs / "supernode.log"

        def connected() -> bool:
            return log_contains(log_path, SUPERNODE_CONNECTED_MARKER) and port_accepts(
                "127.0.0.1", options.clientappio_port
            )

        what = f"being accepted by the SuperLink at {options.superlink}"
        checks = [ReadinessCheck("supernode", process, log_path, connected, what)]
        if warm is not None:
            checks.append(
                start_warm_parent(launcher, warm, [process.pid], warm.environment(child_environment(homes / "warm")))
            )
        try:
            wait_until_ready(checks, options.ready_timeout_s)
        except DeployError as err:
            if key is not None and "No SuperNode found with the given public key" in str(err):
                raise DeployError(
                    f"the SuperLink at {options.superlink} refused this SuperNode's key (No SuperNode found with the "
                    f"given public key): register {key}.pub on the SuperLink machine (`fedcifar-deploy register`)"
                ) from err
            raise
    except BaseException:
        stop_processes(launcher.started, options.stop_grace_s)
        state_path(deploy_dir).unlink(missing_ok=True)
        raise
    return state


def make_node_key(private_key: Path) -> tuple[Path, Path]:
    """An ECDSA P-384 key pair at `private_key` and `private_key`.pub (what `ssh-keygen -t ecdsa -b 384` writes)."""
    return ensure_node_key(private_key.parent, private_key.name)


def remember_registered_key(deploy_dir: Path, public_key: Path) -> Path:
    """Keep a copy of a hand-registered key in DIR/keys/registered/, so that `up`/`superlink` register
    it again after a restart (Flower keeps registrations in the SuperLink's memory only)."""
    content = public_key.read_bytes()
    kept = registered_keys_dir(deploy_dir) / f"{hashlib.sha256(content).hexdigest()[:16]}.pub"
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.write_bytes(content)
    return kept


def register_key(
    public_key: Path, control_project: Path | None, control_address: str, ca_certificate: Path | None
) -> str:
    """Register `public_key` with a SuperLink; its node id.

    On the SuperLink machine `control_project` is DIR/control (written by `up`/`superlink`);
    from elsewhere the SuperLink's Control address and CA make a temporary one.
    """
    if not public_key.is_file():
        raise DeployError(f"{public_key} not found: register the .pub file the SuperNode machine made")
    with tempfile.TemporaryDirectory(prefix="fedcifar-control-") as scratch:
        if control_project is not None:
            remember_registered_key(control_project.parent, public_key)
        if control_project is None:
            check_superlink(control_address, ca_certificate)
            control_project = write_control_project(Path(scratch), control_address, ca_certificate)
        elif not (control_project / "pyproject.toml").is_file():
            raise DeployError(
                f"{control_project} has no pyproject.toml: give the --dir the SuperLink was started with, "
                "or --control HOST:PORT --ca ca.crt"
            )
        env = child_environment(Path(scratch) / "flwr-home")
        (node_id,) = register_node_keys([public_key], control_project, env, timeout_s=60)
    return node_id
