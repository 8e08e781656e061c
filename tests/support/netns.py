"""Separate "hosts" on one Linux machine: network namespaces joined by a bridge.

The bridge lives in a namespace of its own, and every link is created inside the
namespaces made here, so deleting those namespaces removes every link and nothing
touches the machine's own network. Addresses come from a private range and exist
only inside these namespaces. `close()` ends every process still running in them.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

SUBNET = "10.201.7"  # the default private /24; only ever inside the namespaces below


def netns_unavailable() -> str:
    """Why namespaces cannot be used here, or "" when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    probe = f"fcprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return ""


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


class Network:
    """Hosts (namespaces) on one switch; `exec_prefix(host)` runs a command on a host."""

    def __init__(self, subnet: str = SUBNET, tag: str = "fc") -> None:
        self.subnet = subnet  # first three octets of a private /24 no other test uses
        self.tag = f"{tag}{os.getpid() % 100000}"
        self.switch = f"{self.tag}-sw"
        self.hosts: dict[str, str] = {}  # name -> address
        self._namespaces: list[str] = []
        _ip("netns", "add", self.switch)
        self._namespaces.append(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")

    def namespace(self, host: str) -> str:
        return f"{self.tag}-{host}"

    def add_host(self, host: str, host_number: int, extra_numbers: tuple[int, ...] = ()) -> str:
        """A namespace with loopback up and eth0 on the switch at SUBNET.host_number; its address."""
        namespace = self.namespace(host)
        _ip("netns", "add", namespace)
        self._namespaces.append(namespace)
        _ip("-n", namespace, "link", "set", "lo", "up")
        port = self.switch_port(host)
        _ip("link", "add", "eth0", "netns", namespace, "type", "veth", "peer", "name", port, "netns", self.switch)
        _ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
        for number in (host_number, *extra_numbers):
            _ip("-n", namespace, "addr", "add", f"{self.subnet}.{number}/24", "dev", "eth0")
        _ip("-n", namespace, "link", "set", "eth0", "up")
        self.hosts[host] = f"{self.subnet}.{host_number}"
        return self.hosts[host]

    def switch_port(self, host: str) -> str:
        return f"v{self.tag[2:]}{host}"[:15]

    def cut(self, host: str) -> None:
        """Unplug `host` from the switch (its packets go nowhere)."""
        _ip("-n", self.switch, "link", "set", self.switch_port(host), "down")

    def plug(self, host: str) -> None:
        _ip("-n", self.switch, "link", "set", self.switch_port(host), "up")

    def exec_prefix(self, host: str) -> list[str]:
        return ["ip", "netns", "exec", self.namespace(host)]

    def close(self) -> None:
        """SIGKILL what still runs in our namespaces, then delete them (and with them every link)."""
        for namespace in self._namespaces:
            pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        deadline = time.monotonic() + 10
        for namespace in reversed(self._namespaces):
            while time.monotonic() < deadline:
                if subprocess.run(["ip", "netns", "del", namespace], capture_output=True).returncode == 0:
                    break
                time.sleep(0.2)
        self._namespaces.clear()

    def leftovers(self) -> list[str]:
        """Namespaces of this network still present (should be none after close())."""
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        return [line.split()[0] for line in listed.splitlines() if line.startswith(f"{self.tag}-")]
