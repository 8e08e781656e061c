"""The warm start's folder: the parent's socket and the shim's PATH entry, reachable by the owner only.

    FOLDER/            mode 0700: no other user can reach the socket inside
    FOLDER/parent.sock the warm parent listens here (SOCK_SEQPACKET)
    FOLDER/bin/flwr-clientapp -> the ``fedcifar-warm-shim`` console script of this environment

A SuperNode uses the warm start when FOLDER/bin leads its PATH and FEDCIFAR_WARM_SOCKET names the
socket (``environment``); nothing else about it changes.
"""

from __future__ import annotations

import os
import socket
import stat
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ...errors import WarmStartError
from . import protocol

SHIM_SCRIPT = "fedcifar-warm-shim"


def shim_script() -> Path:
    """This environment's ``fedcifar-warm-shim`` console script (beside the interpreter)."""
    script = Path(sys.executable).parent / SHIM_SCRIPT
    if not (script.is_file() and os.access(script, os.X_OK)):
        raise WarmStartError(
            f"{script} not found: reinstall the app (pip install -e .) so that its console scripts exist, or use --cold"
        )
    return script


@dataclass(frozen=True)
class WarmFolder:
    path: Path

    @property
    def socket_path(self) -> Path:
        return self.path / protocol.SOCKET_NAME

    @property
    def bin(self) -> Path:
        return self.path / "bin"

    @classmethod
    def prepare(cls, path: Path) -> WarmFolder:
        """Create (or check) the folder, owner-only, with the shim linked in as bin/flwr-clientapp."""
        folder = cls(path.expanduser().resolve())
        folder.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = folder.path.stat()
        if info.st_uid != os.geteuid():
            raise WarmStartError(f"{folder.path} belongs to uid {info.st_uid}, not to this user; choose another folder")
        if stat.S_IMODE(info.st_mode) & 0o077:
            folder.path.chmod(0o700)
        folder.bin.mkdir(exist_ok=True)
        link, target = folder.bin / "flwr-clientapp", shim_script()
        if not (link.is_symlink() and Path(os.readlink(link)) == target):
            link.unlink(missing_ok=True)
            link.symlink_to(target)
        return folder

    def environment(self, base: Mapping[str, str]) -> dict[str, str]:
        """``base`` with the shim first on PATH and the socket named: a SuperNode's warm-start environment."""
        env = dict(base)
        env["PATH"] = os.pathsep.join([str(self.bin), env.get("PATH", os.defpath)])
        env[protocol.SOCKET_ENV] = str(self.socket_path)
        return env

    def answers(self) -> bool:
        """True when a warm parent accepts connections on the socket."""
        try:
            protocol.connect(str(self.socket_path), timeout_s=1.0).close()
        except OSError:
            return False
        return True

    def bind(self, listener: socket.socket) -> int:
        """Bind `listener` to the socket path; its inode. A stale socket file is replaced, a live parent is not."""
        if self.socket_path.exists() or self.socket_path.is_symlink():
            if self.answers():
                raise WarmStartError(f"a warm parent already serves {self.socket_path}; stop it first")
            self.socket_path.unlink()
        folder_fd = os.open(self.path, os.O_PATH | os.O_DIRECTORY)
        try:
            listener.bind(protocol.short_path(str(self.socket_path), folder_fd))
        finally:
            os.close(folder_fd)
        return self.socket_path.lstat().st_ino

    def unbind(self, inode: int | None) -> None:
        """Remove the socket file if it is still the one bound with `inode` (a later parent's stays)."""
        try:
            if inode is not None and self.socket_path.lstat().st_ino == inode:
                self.socket_path.unlink()
        except OSError:
            pass
