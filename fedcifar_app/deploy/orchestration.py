"""up / down / status: the deployment as a whole, built from the other modules.

The CLI turns its flags into an `UpOptions` (validated when built); nothing
below the CLI sees argparse.
"""

from __future__ import annotations

import contextlib
import datetime
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..client.threads import available_cores
from ..client.warm.folder import WarmFolder
from ..errors import DeployError, WarmStartError
from ..procfs import process_start
from .certificates import ALL_INTERFACES, TlsFiles, certificate_names, ensure_node_key, ensure_tls_files
from .commands import (
    DEFAULT_CLIENTAPPIO_BASE_PORT,
    DEFAULT_SUPERLINK_PORTS,
    DEFAULT_SUPERNODE_MAX_RETRIES,
    DEFAULT_SUPERNODE_MAX_WAIT_S,
    SUPERNODE_CONNECTED_MARKER,
    SuperLinkPorts,
    node_configs,
    superlink_command,
    supernode_command,
    supernode_thread_environment,
    warm_parent_command,
)
from .flwr_cli import register_node_keys, write_control_project
from .processes import (
    ReadinessCheck,
    check_ports_free,
    child_environment,
    live_session_members,
    log_contains,
    port_accepts,
    split_address,
    start_process,
    stop_processes,
    wait_until_ready,
)
from .state import (
    WARM,
    WARM_PARENT_NAME,
    DeploymentState,
    ManagedProcess,
    load_state,
    save_state,
    state_path,
)

DEFAULT_DEPLOY_DIR = ".deploy"
DEFAULT_READY_TIMEOUT_S = 60.0
DEFAULT_STOP_GRACE_S = 10.0
# Where pyproject.toml's local-deployment federations point: this machine's default Control port
# (tests/test_deploy_units.py keeps the two in step).
LOCAL_FEDERATION_ADDRESS = f"127.0.0.1:{SuperLinkPorts(*DEFAULT_SUPERLINK_PORTS).control}"


@dataclass(frozen=True)
class UpOptions:
    """Everything `up` needs; invalid combinations fail when the options are built."""

    directory: Path = Path(DEFAULT_DEPLOY_DIR)
    nodes: int = 2
    tls: bool = False
    auth: bool = False
    superlink_ports: SuperLinkPorts = SuperLinkPorts(*DEFAULT_SUPERLINK_PORTS)
    clientappio_base_port: int = DEFAULT_CLIENTAPPIO_BASE_PORT
    node_configs: tuple[str, ...] = ()
    data_paths: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    tls_sans: tuple[str, ...] = ()
    ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S
    stop_grace_s: float = DEFAULT_STOP_GRACE_S
    supernode_max_retries: int = DEFAULT_SUPERNODE_MAX_RETRIES
    supernode_max_wait_s: float = DEFAULT_SUPERNODE_MAX_WAIT_S
    # Threads per ClientApp; None: this machine's cores / --nodes.
    clientapp_threads: int | None = None
    # ClientApp processes fork from a warm parent (fedcifar-warm) instead of importing torch each; --cold: off.
    warm: bool = True

    def __post_init__(self) -> None:
        if self.auth and not self.tls:
            raise DeployError("--auth needs --tls: Flower allows SuperNode authentication only over TLS")
        if self.nodes < 0:
            raise DeployError(f"--nodes {self.nodes}: give 0 or more SuperNodes")
        if self.clientapp_threads is not None and self.clientapp_threads < 1:
            raise DeployError(f"--clientapp-threads {self.clientapp_threads}: give 1 or more")
        last_port = self.clientappio_base_port + max(self.nodes, 1) - 1
        if not (0 < self.clientappio_base_port and last_port < 65536):
            raise DeployError(
                f"--clientappio-base-port {self.clientappio_base_port} with --nodes {self.nodes} "
                "leaves 1..65535; choose a lower base port"
            )
        clashes = set(self.clientappio_ports) & set(self.superlink_ports.as_tuple())
        if clashes:
            raise DeployError(
                f"ClientAppIo ports {sorted(clashes)} collide with SuperLink ports; move --clientappio-base-port"
            )

    @property
    def clientappio_ports(self) -> list[int]:
        return [self.clientappio_base_port + index for index in range(self.nodes)]

    @property
    def local_host(self) -> str:
        """How this machine reaches Fleet and Control (loopback when they listen on all interfaces)."""
        return "127.0.0.1" if self.host in ALL_INTERFACES else self.host

    @property
    def public_host(self) -> str:
        """The name other machines use: the listen address, else the first --tls-san, else ""."""
        if self.host not in ALL_INTERFACES and self.host != "127.0.0.1":
            return self.host
        return next((name for name in self.tls_sans if name not in ("localhost", "127.0.0.1")), "")


def registered_keys_dir(deploy_dir: Path) -> Path:
    """Public keys registered by hand (`fedcifar-deploy register --dir`), registered again by every `up`."""
    return deploy_dir / "keys" / "registered"


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
        self, name: str, command: list[str], env: Mapping[str, str], address: str, node_config: str = ""
    ) -> subprocess.Popen[bytes]:
        """Start `command` as `name`, logging to logs/<name>.log."""
        log_path = self.logs / f"{name}.log"
        process = start_process(name, command, log_path, self.working_directory, env)
        record = ManagedProcess(
            name, process.pid, process_start(process.pid), str(log_path), command, address, node_config
        )
        self.started.append(record)
        self.state.processes = list(self.started)
        save_state(self.state)
        return process


def start_superlink(launcher: Launcher, options: UpOptions, tls: TlsFiles | None, env: Mapping[str, str]) -> None:
    """Start the SuperLink and wait until its three APIs accept connections."""
    state, ports = launcher.state, options.superlink_ports
    process = launcher.launch(
        "superlink",
        superlink_command(ports, options.host, tls, options.auth),
        env,
        address=f"Fleet {state.fleet_address}, Control {state.control_address}",
    )
    endpoints = [state.serverappio_address, state.fleet_address, state.control_address]

    def all_ports_accept() -> bool:
        return all(port_accepts(*split_address(endpoint)) for endpoint in endpoints)

    what = f"ports {ports.serverappio}, {ports.fleet}, {ports.control} accepting connections"
    check = ReadinessCheck("superlink", process, launcher.logs / "superlink.log", all_ports_accept, what)
    wait_until_ready([check], options.ready_timeout_s)


def prepare_warm_start(state: DeploymentState) -> WarmFolder:
    """DIR/warm (the warm parent's socket and the shim), recorded in the state before anything uses it."""
    try:
        folder = WarmFolder.prepare(Path(state.directory) / "warm")
    except (WarmStartError, OSError) as err:
        raise DeployError(f"the warm ClientApp start cannot be set up ({err}); use --cold to run without it") from err
    state.clientapp_start, state.warm_folder = WARM, str(folder.path)
    save_state(state)
    return folder


def start_warm_parent(
    launcher: Launcher, folder: WarmFolder, supernode_pids: Sequence[int], env: Mapping[str, str]
) -> ReadinessCheck:
    """Start `fedcifar-warm` for these SuperNodes (it ends when they all have); ready once it accepts."""
    command = warm_parent_command(folder.path, supernode_pids)
    process = launcher.launch(WARM_PARENT_NAME, command, env, address=f"socket {folder.socket_path}")
    log_path = launcher.logs / f"{WARM_PARENT_NAME}.log"
    return ReadinessCheck(WARM_PARENT_NAME, process, log_path, folder.answers, "importing torch and Flower")


def start_supernodes(
    launcher: Launcher,
    options: UpOptions,
    configs: Sequence[str],
    tls: TlsFiles | None,
    private_keys: Sequence[Path | None],
) -> None:
    """Start all SuperNodes (and their warm parent), then wait until each one is accepted by the SuperLink."""
    threads = (
        supernode_thread_environment(options.clientapp_threads, 1)
        if options.clientapp_threads
        else supernode_thread_environment(available_cores(), options.nodes)
    )
    homes = Path(launcher.state.directory) / "flwr-home"
    warm = prepare_warm_start(launcher.state) if options.warm and options.nodes else None
    checks = []
    for index, (config, port, private_key) in enumerate(
        zip(configs, options.clientappio_ports, private_keys, strict=True)
    ):
        name = f"supernode-{index}"
        command = supernode_command(
            launcher.state.fleet_address,
            f"127.0.0.1:{port}",
            config,
            tls.ca_certificate if tls else None,
            private_key,
            options.supernode_max_retries,
            options.supernode_max_wait_s,
        )
        env = child_environment(homes / name, threads)
        if warm is not None:
            env = warm.environment(env)
        process = launcher.launch(name, command, env, address=f"ClientAppIo 127.0.0.1:{port}", node_config=config)
        log_path = launcher.logs / f"{name}.log"

        def connected(log_path: Path = log_path, port: int = port) -> bool:
            return log_contains(log_path, SUPERNODE_CONNECTED_MARKER) and port_accepts("127.0.0.1", port)

        checks.append(ReadinessCheck(name, process, log_path, connected, "connecting to the SuperLink"))
    if warm is not None:
        # The SuperNodes' own environment, so that what libraries read at load is the same in both.
        env = warm.environment(child_environment(homes / WARM_PARENT_NAME, threads))
        checks.append(start_warm_parent(launcher, warm, [check.process.pid for check in checks], env))
    wait_until_ready(checks, options.ready_timeout_s)


def bring_up(options: UpOptions) -> DeploymentState:
    """Start SuperLink and SuperNodes; on any failure stop them all and raise."""
    configs = node_configs(options.nodes, options.node_configs, options.data_paths)
    deploy_dir = options.directory.expanduser().resolve()
    previous = load_state(deploy_dir)
    if previous is not None and deployment_is_running(previous):
        raise DeployError(
            f"a deployment from {deploy_dir} is still running; run `fedcifar-deploy down --dir {options.directory}` first"
        )
    ports = options.superlink_ports
    check_ports_free("127.0.0.1", [ports.serverappio, *options.clientappio_ports])
    check_ports_free(options.host, [ports.fleet, ports.control])

    deploy_dir.mkdir(parents=True, exist_ok=True)
    names = certificate_names(options.host, options.tls_sans)
    tls = ensure_tls_files(deploy_dir / "certs", names) if options.tls else None
    public = options.public_host
    state = DeploymentState(
        directory=str(deploy_dir),
        started_at=datetime.datetime.now().isoformat(timespec="seconds"),
        working_directory=str(Path.cwd()),
        tls=options.tls,
        auth=options.auth,
        fleet_address=f"{options.local_host}:{ports.fleet}",
        control_address=f"{options.local_host}:{ports.control}",
        serverappio_address=f"127.0.0.1:{ports.serverappio}",
        ca_certificate=str(tls.ca_certificate) if tls else "",
        public_fleet_address=f"{public}:{ports.fleet}" if public else "",
        public_control_address=f"{public}:{ports.control}" if public else "",
        listen_host=options.host,
    )
    launcher = Launcher(state, deploy_dir / "logs", Path.cwd())
    superlink_env = child_environment(deploy_dir / "flwr-home" / "superlink")
    try:
        start_superlink(launcher, options, tls, superlink_env)
        ca = tls.ca_certificate if tls else None
        state.control_project = str(write_control_project(deploy_dir / "control", state.control_address, ca))
        save_state(state)

        private_keys: list[Path | None] = [None] * options.nodes
        if options.auth:
            key_pairs = [ensure_node_key(deploy_dir / "keys", f"supernode-{index}") for index in range(options.nodes)]
            private_keys = [private for private, _ in key_pairs]
            # Registered before the SuperNodes start: the SuperLink refuses unknown keys.
            public_keys = [public_key for _, public_key in key_pairs]
            public_keys += sorted(registered_keys_dir(deploy_dir).glob("*.pub"))
            register_node_keys(public_keys, Path(state.control_project), superlink_env, options.ready_timeout_s)
        start_supernodes(launcher, options, configs, tls, private_keys)
    except BaseException:
        stop_processes(list(reversed(launcher.started)), options.stop_grace_s)
        with contextlib.suppress(OSError):  # a read-only folder must not hide why `up` failed
            state_path(deploy_dir).unlink(missing_ok=True)
        raise
    return state


def bring_down(deploy_dir: Path, grace_s: float) -> str:
    """End the recorded processes (SuperNodes first), drop the state, keep logs; what was done, in words."""
    deploy_dir = deploy_dir.expanduser().resolve()
    state = load_state(deploy_dir)
    if state is None:
        return f"nothing to stop: no {state_path(deploy_dir).name} in {deploy_dir}"
    superlinks = [record for record in state.processes if record.name == "superlink"]
    warm_parents = [record for record in state.processes if record.name == WARM_PARENT_NAME]
    supernodes = [record for record in state.processes if record not in superlinks + warm_parents]
    # Nodes first, so they leave the SuperLink cleanly instead of retrying it; their warm parent next
    # (with it, any ClientApp it forked: they share its process group).
    killed = stop_processes(supernodes, grace_s)
    killed += stop_processes(warm_parents, grace_s)
    killed += stop_processes(superlinks, grace_s)
    leftovers = [record.name for record in state.processes if live_session_members(record)]
    if leftovers:
        raise DeployError(f"could not stop {', '.join(leftovers)}; state kept in {deploy_dir}")
    state_path(deploy_dir).unlink(missing_ok=True)
    names = ", ".join(record.name for record in state.processes) or "nothing"
    note = f" (killed after {grace_s:.0f} s: {', '.join(killed)})" if killed else ""
    return f"stopped {names}{note}; logs kept in {deploy_dir / 'logs'}"


def suggested_run_command(state: DeploymentState, app_dir: Path) -> str:
    """The `flwr run` line that reaches this deployment from `app_dir` on this machine."""
    federation = "local-deployment-tls" if state.tls else "local-deployment"
    overrides = []
    if state.control_address != LOCAL_FEDERATION_ADDRESS:
        overrides.append(f"address='{state.control_address}'")
    if state.tls:
        default_ca = (app_dir / DEFAULT_DEPLOY_DIR / "certs" / "ca.crt").resolve()
        if Path(state.ca_certificate).resolve() != default_ca:
            overrides.append(f"root-certificates='{state.ca_certificate}'")
    command = f"flwr run . {federation} --stream"
    if overrides:
        command += f' --federation-config "{" ".join(overrides)}"'
    return command


def other_machines_hint(state: DeploymentState) -> str:
    """What other machines must use to reach this SuperLink, or "" when it listens on loopback only."""
    if state.listen_host in ("127.0.0.1", "localhost"):
        return ""
    fleet_port, control_port = split_address(state.fleet_address)[1], split_address(state.control_address)[1]
    if not state.public_fleet_address:
        return (
            f"other machines: this machine's address with Fleet port {fleet_port} (flower-supernode --superlink) "
            f"and Control port {control_port} (federation address); with --tls, name it with --tls-san"
        )
    ca = f", root-certificates = a copy of {state.ca_certificate}" if state.tls else ""
    return (
        f"other machines: flower-supernode --superlink {state.public_fleet_address}; "
        f"federation address = '{state.public_control_address}'{ca}"
    )


def clientapp_start_text(state: DeploymentState) -> str:
    """How the SuperNodes start their ClientApp processes, in words (the `status` line)."""
    if state.clientapp_start != WARM:
        return "cold start (one fresh flwr-clientapp process per message; `up` without --cold starts them warm)"
    parent = next((record for record in state.processes if record.name == WARM_PARENT_NAME), None)
    if parent is not None and live_session_members(parent):
        return f"warm start (forked from {WARM_PARENT_NAME} pid {parent.pid}, socket {state.warm_folder}/parent.sock)"
    return (
        f"cold, each with a warning: the warm parent ({WARM_PARENT_NAME}) is not running; "
        "run `fedcifar-deploy down` and `up` again to start it"
    )


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
    if any(record.name != "superlink" for record in state.processes):
        lines.append(f"ClientApps: {clientapp_start_text(state)}")
    hint = other_machines_hint(state)
    if hint:
        lines.append(hint)
    lines.append(f"ServerApp working directory: {state.working_directory} (a relative output-dir lands here)")
    return "\n".join(lines)


def deployment_status(deploy_dir: Path) -> tuple[str, bool]:
    """(`status` text, whether every recorded process still runs)."""
    deploy_dir = deploy_dir.expanduser().resolve()
    state = load_state(deploy_dir)
    if state is None:
        return f"no deployment recorded in {deploy_dir}", False
    text = f"deployment in {deploy_dir}, started {state.started_at}\n{describe(state)}"
    return text, all(live_session_members(record) for record in state.processes)
