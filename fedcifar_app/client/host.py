"""Which machine a ClientApp runs on, as its replies tell the server.

On a Ray cluster the simulation engine hands each message to an actor on any host, so the data
check's reply says where a sampled node ran and every reply says which host served it (the
server counts them). In a Ray actor the reply also names the actor: when a host dies, the error
that comes back names only the lost actor, and the server finds its host among earlier replies.
Torch-free and Flower-free; Ray is asked only when this process is already a Ray worker.
"""

from __future__ import annotations

import socket
import sys

# The keys of a reply's "info" record: the node's data (its partition or data-path; the server orders
# replies by it before aggregating), the host and the Ray actor that served it.
DATA_KEY = "data"
HOST_KEY = "host"
RAY_ACTOR_KEY = "ray-actor"


def _ray_worker():
    """The ray module when this process is a connected Ray worker (a simulation actor), else None."""
    ray = sys.modules.get("ray")
    return ray if ray is not None and ray.is_initialized() else None


def this_host() -> dict[str, str]:
    """``{"host": "name (ip)"}`` and, in a Ray actor, ``"ray-actor": <actor id>``.

    The host name alone can repeat (containers, network namespaces), so a Ray worker adds its Ray
    node's IP, the address its cluster knows it by.
    """
    name = socket.gethostname()
    ray = _ray_worker()
    if ray is None:
        return {HOST_KEY: name}
    facts = {HOST_KEY: f"{name} ({ray.util.get_node_ip_address()})"}
    actor = ray.get_runtime_context().get_actor_id()
    if actor:
        facts[RAY_ACTOR_KEY] = actor
    return facts


def on_other_hosts() -> bool:
    """True in a Ray worker of a cluster with more than one live host: there an error reply names
    its host, since the data behind a path may differ between hosts (absent, another copy)."""
    ray = _ray_worker()
    if ray is None:
        return False
    try:
        return sum(1 for node in ray.nodes() if node.get("Alive")) > 1
    except Exception:  # the cluster cannot be asked: say nothing rather than fail the reply
        return False
