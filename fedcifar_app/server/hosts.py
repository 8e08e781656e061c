"""Which hosts served a run, and a lost Ray actor turned into one line that names its host.

Every ClientApp reply names the host it ran on (client/host.py); on one machine that is one
host, on a Ray cluster the simulation engine spreads the virtual nodes' messages over the actors
of every host. The ledger counts the replies per host for the run's log and remembers which host
each Ray actor lives on.

A host that leaves a Ray cluster mid-run (its raylet killed, the machine gone) takes its actors
with it, and so does an actor process that dies (out of memory). The reply that comes back names
only the actor (``ActorUnavailableError`` at once, ``ActorDiedError`` once Ray has declared the
node dead), and Flower 1.25's engine keeps the dead actor in its pool: every later message that
reaches it fails too, so the run would limp on with a share of its nodes failing each round.
``lost_actor`` recognises such a reply; the hooks then end the run with one line and the resume
command, which starts a fresh engine on the hosts that are left.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import Message

from ..client.host import DATA_KEY, HOST_KEY, RAY_ACTOR_KEY

# Ray's exceptions for a call to an actor that is gone; Flower puts the class name in the reason.
ACTOR_LOST = re.compile(r"\b(ActorDiedError|ActorUnavailableError|RayActorError)\b")
ACTOR_ID = re.compile(r"\b[Aa]ctor(?:_id:)? ?([0-9a-f]{32})\b")
ACTOR_IP = re.compile(r"^\s*ip: (\S+)\s*$", re.MULTILINE)


def reply_data(reply: Message) -> str:
    """The node's data (partition or data-path) that a result reply names; "" for an error or an older ClientApp."""
    if reply.has_error() or "info" not in reply.content.config_records:
        return ""
    return str(reply.content.config_records["info"].get(DATA_KEY, ""))


def reply_host(reply: Message) -> tuple[str, str] | None:
    """(host, Ray actor id or "") that a result reply names; None for an error or an older ClientApp."""
    if reply.has_error() or "info" not in reply.content.config_records:
        return None
    info = reply.content.config_records["info"]
    if HOST_KEY not in info:
        return None
    return str(info[HOST_KEY]), str(info.get(RAY_ACTOR_KEY, ""))


@dataclass
class HostLedger:
    """Replies per host over the whole run (data check included), and Ray actor -> host."""

    replies: Counter[str] = field(default_factory=Counter)
    actor_hosts: dict[str, str] = field(default_factory=dict)

    def note(self, replies: Iterable[Message]) -> None:
        for reply in replies:
            found = reply_host(reply)
            if found is None:
                continue
            host, actor = found
            self.replies[host] += 1
            if actor:
                self.actor_hosts[actor] = host

    def lost_actor(self, reason: str | None) -> str | None:
        """For an error reason that says a Ray actor is gone: where it was ("host w2 (10.0.0.3)");
        None for any other error."""
        reason = reason or ""
        kind = ACTOR_LOST.search(reason)
        if kind is None:
            return None
        actor = ACTOR_ID.search(reason)
        host = self.actor_hosts.get(actor[1]) if actor else None
        if host is None and (ip := ACTOR_IP.search(reason)):  # an actor that never replied: Ray names its IP
            host = next((known for known in self.replies if known.endswith(f"({ip[1]})")), ip[1])
        return f"host {host}" if host else "a host this run never heard from"

    def summary(self) -> str | None:
        """``2 hosts: w1 (10.0.0.2) 9 replies, w2 (10.0.0.3) 9 replies``; None when one host did it all."""
        if len(self.replies) < 2:
            return None
        hosts = ", ".join(f"{host} {count} replies" for host, count in sorted(self.replies.items()))
        return f"{len(self.replies)} hosts: {hosts}"
