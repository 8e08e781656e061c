"""The warm start's messages: one Unix SOCK_SEQPACKET connection per ClientApp start.

    shim   -> parent  request (argv, environment, cwd, process settings; stdin/out/err as SCM_RIGHTS)
    parent -> shim    refuse  (reason): the shim starts Flower's flwr-clientapp cold
    child  -> shim    ready   (pid): the forked child has taken on the shim's process state
    shim   -> child   go: only now does the child run the ClientApp
    parent -> shim    exit    (code; negative: killed by that signal)

SEQPACKET keeps every message whole, so the parent and its forked child can both write to the one
connection. ``go`` makes a start exactly-once: a shim that gave up waiting (and went cold) never
sends it, and a child that does not get it exits without touching the message.
Stdlib only, and cheap to import: the shim imports it for every message.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Sequence
from typing import Any

# The environment variable that tells the shim where the warm parent listens.
SOCKET_ENV = "FEDCIFAR_WARM_SOCKET"
SOCKET_NAME = "parent.sock"
MAGIC = b"fedcifar-warm/1 "
# A request over this (an environment of some 200 KB) goes cold: one SEQPACKET message must fit the
# socket's send buffer, which Linux caps at net.core.wmem_max (212,992 bytes by default).
MAX_MESSAGE_BYTES = 200_000
SOCKET_PATH_LIMIT = 100  # sun_path holds 108 bytes with the final NUL; keep a margin
STDIO_FDS = 3

REQUEST, REFUSE, READY, GO, EXIT = "request", "refuse", "ready", "go", "exit"


class ProtocolError(OSError):
    """A message that is not ours, cut short, or of the wrong kind."""


def short_path(path: str, folder_fd: int) -> str:
    """``path`` as a Unix socket address: a socket path has at most 107 bytes, so a longer one is
    reached through the already opened folder (/proc/self/fd/N/NAME)."""
    if len(os.fsencode(path)) < SOCKET_PATH_LIMIT:
        return path
    return f"/proc/self/fd/{folder_fd}/{os.path.basename(path)}"


def connect(path: str, timeout_s: float) -> socket.socket:
    """A connection to the warm parent at ``path`` (OSError when nobody listens there)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(timeout_s)
    folder_fd = os.open(os.path.dirname(path) or ".", os.O_PATH | os.O_DIRECTORY)
    try:
        sock.connect(short_path(path, folder_fd))
    except BaseException:
        sock.close()
        raise
    finally:
        os.close(folder_fd)
    return sock


def send(sock: socket.socket, kind: str, fds: Sequence[int] = (), **fields: Any) -> None:
    """Send one message; strings from os.fsdecode survive (JSON escapes their surrogates)."""
    data = MAGIC + json.dumps({"kind": kind, **fields}).encode("ascii")
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(data)} bytes is over {MAX_MESSAGE_BYTES}")
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.send(data)


def receive(sock: socket.socket, max_fds: int = 0) -> tuple[dict[str, Any] | None, list[int]]:
    """One message and the file descriptors that came with it; (None, []) when the peer closed."""
    data, fds, flags, _ = socket.recv_fds(sock, MAX_MESSAGE_BYTES + 1, max_fds)
    try:
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise ProtocolError("message cut short")
        if not data:
            if fds:
                raise ProtocolError("file descriptors without a message")
            return None, []
        if not data.startswith(MAGIC):
            raise ProtocolError("not a warm-start message")
        message = json.loads(data[len(MAGIC) :])
        if not isinstance(message, dict) or not isinstance(message.get("kind"), str):
            raise ProtocolError("message without a kind")
    except (ProtocolError, ValueError) as err:
        for fd in fds:
            _close_quietly(fd)
        raise ProtocolError(str(err)) from err
    return message, fds


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
