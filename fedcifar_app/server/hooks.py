"""The hooks any Flower strategy gets in this app: bounded waits, failing nodes named once,
divergence stopped, round records.

``with_app_hooks(FedAvg)`` (or FedProx, FedAdam, a DP wrapper, ...) returns a subclass whose
four small hooks (``configure_*`` / ``aggregate_*``) do this app's work and then defer to the
Flower class; ``Strategy.start`` (the round loop) always stays Flower's.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from ..errors import RunAborted, TrainingDiverged
from ..logs import APP_LOGGER
from ..runs.metrics import TRAIN_LOSS, number, scalars
from ..training import weights_are_finite
from .divergence import RoundEvidence
from .hosts import HostLedger, reply_data

logger = logging.getLogger(APP_LOGGER)

__all__ = ["AppHooks", "RoundSink", "RunAborted", "StrategyHooks", "with_app_hooks", "wait_for_nodes"]


_FLOWER_REASON = re.compile(r"^<class '(?P<cls>[\w.]+)'>:<'(?P<text>.*)'>$", re.DOTALL)


def short_reason(reason: str | None) -> str:
    """A node's error in one line.

    Flower reports a ClientApp exception as ``<class 'X'>:<'text'>``, where for its own
    ClientAppException the text is "\\nException ClientAppException occurred. Message: ...";
    this app's own error replies are already one line.
    """
    reason = (reason or "").strip()
    match = _FLOWER_REASON.match(reason)
    if match:
        name, text = match["cls"].rsplit(".", 1)[-1], match["text"]
        text = text.split("occurred. Message: ", 1)[1] if "occurred. Message: " in text else text
        lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
        text = lines[-1] if lines else ""
        return text if name == "ClientAppException" else f"{name}: {text}"
    lines = [line.strip() for line in reason.splitlines() if line.strip()]
    return lines[-1] if lines else "unknown error"


def replies_by_node(sent: Iterable[Message], replies: Iterable[Message]) -> dict[int, Message]:
    """Destination node of each sent message -> its reply; a node with no reply is absent.

    Replies are matched on the message they answer, not on their source: when a SuperNode
    stops sending heartbeats, the SuperLink answers in its place (NODE_UNAVAILABLE) under
    its own node id. The grid sets each sent message's id when it pushes it.
    """
    destination = {message.metadata.message_id: message.metadata.dst_node_id for message in sent}
    return {destination.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id): reply for reply in replies}


def failed_nodes(sent: Iterable[Message], replies: Iterable[Message], round_timeout: float) -> dict[int, str]:
    """Node id -> one-line reason, for every node that was sent a message and returned no result."""
    sent = list(sent)
    by_node = replies_by_node(sent, replies)
    failures = {}
    for node_id in dict.fromkeys([message.metadata.dst_node_id for message in sent] + list(by_node)):
        reply = by_node.get(node_id)
        if reply is None:
            failures[node_id] = f"no reply within round-timeout={round_timeout:g}s"
        elif reply.has_error():
            failures[node_id] = short_reason(reply.error.reason)
    return failures


SIMULATION_REGISTRATION_GRACE_S = 30.0  # Flower registers simulated nodes just after the ServerApp starts


def wait_for_nodes(grid: Grid, needed: int, timeout: float, *, simulation: bool) -> list[int]:
    """Return the connected node ids once ``needed`` are there; give up after ``timeout`` seconds.

    Flower's own sampling waits without limit. In simulation the engine registers every node
    at once, a moment after the ServerApp thread starts: a shortfall is final once some nodes
    are there and their number held for one poll (or nothing came within the grace period).
    """
    started = time.monotonic()
    deadline = started + timeout
    next_report = 0.0
    previous_count = -1
    while True:
        node_ids = sorted(grid.get_node_ids())
        if len(node_ids) >= needed:
            return node_ids
        now = time.monotonic()
        settled = len(node_ids) > 0 and len(node_ids) == previous_count
        if simulation and (settled or now - started >= SIMULATION_REGISTRATION_GRACE_S):
            raise RunAborted(
                f"the simulated federation has {len(node_ids)} SuperNodes but the run config needs {needed} "
                "(min-available-nodes / min-train-nodes / min-evaluate-nodes): lower them with --run-config "
                f"or raise options.num-supernodes in pyproject.toml (a --federation-config override must restate "
                "every other option too, see docs/configuration.md)"
            )
        previous_count = len(node_ids)
        if not simulation and now >= deadline:
            raise RunAborted(
                f"only {len(node_ids)} of the {needed} SuperNodes needed connected within node-wait-timeout="
                f"{timeout:g}s: start more SuperNodes, lower min-available-nodes, or raise node-wait-timeout"
            )
        if not simulation and now >= next_report:
            logger.info(
                "Waiting for SuperNodes: %d connected, %d needed (giving up in %.0fs)",
                len(node_ids),
                needed,
                deadline - now,
            )
            next_report = now + 10.0
        time.sleep(0.5 if not simulation else 0.1)


class RoundSink(Protocol):
    """Where the strategy hands a round's client metrics (the run folder's recorder)."""

    def global_round(self, local_round: int) -> int: ...

    def begin_round(self) -> None: ...

    def add_client_metrics(self, metrics: Mapping[str, float]) -> None: ...


@dataclass
class Aggregation:
    """One round's train aggregation, by reference: the global model sent, the replies, the aggregate.

    Kept until the next round's, so that a round that diverges, in the aggregation or in the central
    evaluation after it, can be explained (``divergence.blame``) without CPU spent on the rounds that do
    not; the price is memory: one round's replies stay alive beside the next round's (nodes x model
    size: 2.5 MB for the default 10 nodes, ~250 MB for 1,000 sampled nodes a round).
    """

    sent: ArrayRecord
    replies: list[Message]
    aggregated: ArrayRecord | None

    def evidence(self) -> RoundEvidence:
        sent = {key: array.numpy().astype(np.float64) for key, array in self.sent.items()}
        losses, steps = [], []
        for reply in self.replies:
            if reply.has_error():
                continue
            losses += [number(r, TRAIN_LOSS) for r in reply.content.metric_records.values() if TRAIN_LOSS in r]
            steps += [_distance(sent, arrays) for arrays in reply.content.array_records.values()]
        return RoundEvidence(
            client_losses_finite=all(math.isfinite(loss) for loss in losses),
            client_step=max(steps, default=0.0),
            server_step=None if self.aggregated is None else _distance(sent, self.aggregated),
            num_weights=sum(array.size for array in sent.values()),
        )


def _distance(origin: Mapping[str, np.ndarray], arrays: ArrayRecord) -> float:
    """L2 distance over all weights, in float64; inf when any weight is not finite."""
    total = 0.0
    for key, array in arrays.items():
        difference = (array.numpy().astype(np.float64) - origin[key]).ravel()
        total += float(np.dot(difference, difference))
    return math.sqrt(total) if math.isfinite(total) else math.inf


@dataclass
class StrategyHooks:
    """What the hooks need to know about the run; one object, so any strategy class takes it alike."""

    recorder: RoundSink
    needed_nodes: int  # max(min-available-nodes, min-train-nodes, min-evaluate-nodes)
    min_train_nodes: int
    node_wait_timeout: float
    round_timeout: float
    simulation: bool
    node_names: Mapping[int, str] = field(default_factory=dict)
    at_round_boundary: Callable[[], None] = lambda: None  # raises RunStopped once the run is stopped
    hosts: HostLedger = field(default_factory=HostLedger)  # which hosts replied (a Ray cluster has several)
    resume_hint: Callable[[], str] = lambda: ""  # "; resume ... with: <command>" once a round is checkpointed
    sent: list[Message] = field(default_factory=list)  # this stage's messages, to tell whose reply is missing
    sent_arrays: ArrayRecord | None = None  # the global model this round's training started from
    last_aggregation: Aggregation | None = None  # what explains a divergence (see Aggregation)
    reported: set[tuple[int, int]] = field(default_factory=set)  # (round, node): each failure named once

    def report_failures(self, round_number: int, stage: str, replies: list[Message]) -> int:
        """One WARNING per failing or silent node and round; returns how many replies carry results.

        A lost Ray actor ends the run instead (server/hosts.py: the engine would keep feeding it messages).
        """
        self.hosts.note(replies)
        for reply in replies:
            lost = self.hosts.lost_actor(reply.error.reason) if reply.has_error() else None
            if lost is not None:
                raise RunAborted(
                    f"round {round_number} {stage}: the ClientApp actor on {lost} is gone "
                    f"({short_reason(reply.error.reason)[:160]}): a host left the Ray cluster or the actor's process "
                    "died, and Flower's simulation engine does not replace lost actors, so the run stops here"
                    f"{self.resume_hint() or '; start it again'}"
                )
        for node_id, reason in failed_nodes(self.sent, replies, self.round_timeout).items():
            if (round_number, node_id) not in self.reported:
                self.reported.add((round_number, node_id))
                name = self.node_names.get(node_id, node_id)
                logger.warning("round %d %s: node %s failed: %s", round_number, stage, name, reason)
        return sum(not reply.has_error() for reply in replies)

    def in_node_order(self, replies: Iterable[Message]) -> list[Message]:
        """``replies`` ordered by the node's data (its partition or data-path, which each reply names), not
        by arrival: an aggregation's float sums follow the order of its replies, so in arrival order two
        runs with one seed (or a run and its resume) differ in the last bits of every weight. Node ids
        order only what names no data (errors); simulated nodes get random ids."""
        destination = {message.metadata.message_id: message.metadata.dst_node_id for message in self.sent}

        def node_order(reply: Message) -> tuple[str, int]:
            node = destination.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            return (reply_data(reply) or self.node_names.get(node, ""), node)

        return sorted(replies, key=node_order)


def check_finite(round_number: int, arrays: ArrayRecord | None, metrics: MetricRecord | None) -> None:
    """Stop before a NaN/inf model is evaluated, recorded or checkpointed."""
    loss = number(metrics, TRAIN_LOSS) if metrics is not None and TRAIN_LOSS in metrics else 0.0
    weights_ok = arrays is None or weights_are_finite(arrays.to_torch_state_dict())
    if not (math.isfinite(loss) and weights_ok):
        raise TrainingDiverged(
            f"round {round_number}: training diverged (train-loss {loss:g}"
            f"{'' if weights_ok else ', aggregated weights not finite'})"
        )


if TYPE_CHECKING:  # the type checker reads the mixin as going before FedAvg, whose hooks every strategy shares
    from flwr.serverapp.strategy import FedAvg as _FlowerStrategy
else:
    _FlowerStrategy = object


class AppHooks(_FlowerStrategy):
    """Mixin placed before a Flower strategy class (see ``with_app_hooks``). What it does to Flower's calls:

    - ``server_round``: Flower's ``start`` counts this process's rounds from 1. Each hook passes the run's
      global round instead (``recorder.global_round``: plus the rounds a resumed run had finished) to the
      Flower class, so the round number sent to the nodes, and the seeds they derive from it, follow the
      whole run. ``evaluate_fn`` still gets Flower's count; the recorder adds the offset there.
    - ``configure_train`` first passes the round boundary (a requested stop raises there), begins the
      round's record and waits, bounded, for the nodes; ``configure_evaluate`` waits too.
    - ``configure_*`` keep the messages they send in ``hooks.sent``; the matching ``aggregate_*`` reads
      them to name each node that failed or never replied (once per round and node).
    - ``aggregate_train`` refuses a round with fewer than min-train-nodes results, keeps the aggregation
      (``hooks.last_aggregation``) to explain a divergence, stops on NaN/inf before anything is recorded,
      and hands the aggregated client metrics to the recorder, as ``aggregate_evaluate`` does.
    """

    def __init__(self, *args: Any, app_hooks: StrategyHooks, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.app_hooks = app_hooks

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        hooks = self.app_hooks
        hooks.at_round_boundary()
        hooks.recorder.begin_round()
        wait_for_nodes(grid, hooks.needed_nodes, hooks.node_wait_timeout, simulation=hooks.simulation)
        round_number = hooks.recorder.global_round(server_round)
        hooks.sent_arrays = arrays
        hooks.sent = list(super().configure_train(round_number, arrays, config, grid))
        return hooks.sent

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        hooks = self.app_hooks
        wait_for_nodes(grid, hooks.needed_nodes, hooks.node_wait_timeout, simulation=hooks.simulation)
        round_number = hooks.recorder.global_round(server_round)
        hooks.sent = list(super().configure_evaluate(round_number, arrays, config, grid))
        return hooks.sent

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        hooks = self.app_hooks
        replies = hooks.in_node_order(replies)
        round_number = hooks.recorder.global_round(server_round)
        ok = hooks.report_failures(round_number, "train", replies)
        if ok < hooks.min_train_nodes:
            raise RunAborted(
                f"round {round_number}: {ok} node(s) returned training results, fewer than "
                f"min-train-nodes={hooks.min_train_nodes}; fix the failing nodes (errors above), "
                "or lower min-train-nodes, then resume with resume-from"
            )
        arrays, metrics = super().aggregate_train(round_number, replies)
        if hooks.sent_arrays is not None:
            hooks.last_aggregation = Aggregation(hooks.sent_arrays, replies, arrays)
        check_finite(round_number, arrays, metrics)
        if metrics is not None:
            hooks.recorder.add_client_metrics(scalars(metrics))
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        hooks = self.app_hooks
        replies = hooks.in_node_order(replies)
        round_number = hooks.recorder.global_round(server_round)
        hooks.report_failures(round_number, "evaluate", replies)
        metrics = super().aggregate_evaluate(round_number, replies)
        if metrics is not None:
            hooks.recorder.add_client_metrics(scalars(metrics))
        return metrics


def with_app_hooks(strategy_class: type) -> type:
    """``strategy_class`` with this app's hooks: construct it with the class's own arguments plus
    ``app_hooks=StrategyHooks(...)``. Works for any ``flwr.serverapp.strategy`` class, DP wrappers included."""
    return type(f"{strategy_class.__name__}WithAppHooks", (AppHooks, strategy_class), {})
