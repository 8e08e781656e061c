"""The state file: what `up` started, read back by `down` and `status`.

It is written after every process start, atomically (temp file, fsync, rename),
so a crash of `up` at any moment leaves a file that names every pid to stop.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import DeployError
from ..files import atomic_write_bytes

STATE_FILE_NAME = "state.json"
WARM_PARENT_NAME = "warm-start"  # the ManagedProcess of the warm ClientApp parent (fedcifar-warm)
WARM, COLD = "warm", "cold"  # how the SuperNodes start their ClientApp processes


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
    """What `up` wrote to DIR/state.json."""

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
    # The address other machines use for Fleet and Control (differs from the loopback
    # addresses above when the SuperLink listens on all interfaces).
    public_fleet_address: str = ""
    public_control_address: str = ""
    listen_host: str = "127.0.0.1"
    # WARM: each SuperNode's ClientApps fork from the warm parent in `warm_folder`; COLD: Flower's own start.
    clientapp_start: str = COLD
    warm_folder: str = ""
    processes: list[ManagedProcess] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> DeploymentState:
        """Rebuild the state from `to_json`'s text (fields added later get their defaults)."""
        raw = json.loads(text)
        raw["processes"] = [ManagedProcess(**entry) for entry in raw.get("processes", [])]
        return cls(**raw)


def state_path(deploy_dir: Path) -> Path:
    """The pid/state file of the deployment in `deploy_dir`."""
    return deploy_dir / STATE_FILE_NAME


def save_state(state: DeploymentState) -> None:
    """Write the state atomically, so a crash mid-write never loses the pids."""
    atomic_write_bytes(state_path(Path(state.directory)), state.to_json().encode())


def load_state(deploy_dir: Path) -> DeploymentState | None:
    """The recorded deployment in `deploy_dir`, or None when nothing was started."""
    path = state_path(deploy_dir)
    if not path.is_file():
        return None
    try:
        return DeploymentState.from_json(path.read_text(encoding="utf-8"))
    except (ValueError, TypeError, KeyError) as err:
        raise DeployError(f"cannot read {path} ({err}); stop its processes by hand") from err
