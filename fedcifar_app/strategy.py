"""FedAvg with the few hooks this app needs: bounded waits, failure reports, round records.

Only the small hooks are overridden; ``Strategy.start`` (the round loop) stays Flower's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from .results import RunRecorder

logger = logging.getLogger("flwr.fedcifar_app")


def short_reason(reason: str) -> str:
    """A node's error in one line: Flower wraps a ClientApp exception in a traceback."""
    lines = [line.strip() for line in reason.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else "unknown error"
    return last.removesuffix("'>").replace("Exception ClientAppException occurred. Message: ", "")


def replies_by_node(sent: Iterable[Message], replies: Iterable[Message]) -> dict[int, Message]:
    """Destination node of each sent message -> its reply; a node with no reply is absent.

    Replies are matched on the message they answer, not on their source: when a SuperNode
    stops sending heartbeats, the SuperLink answers in its place (NODE_UNAVAILABLE) under
    its own node id. The grid sets each sent message's id when it pushes it.
    """
    destination = {message.metadata.message_id: message.metadata.dst_node_id for message in sent}
    return {destination.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id): reply for reply in replies}


class RunAborted(RuntimeError):
    """The run cannot go on (too few nodes or replies); the message says why and what to do."""


def wait_for_nodes(grid: Grid, needed: int, timeout: float, *, simulation: bool) -> list[int]:
    """Return the connected node ids once ``needed`` are there; give up after ``timeout`` seconds.

    Flower's own sampling waits without limit. In simulation every node is registered at
    start, so a shortfall there is final and reported at once.
    """
    deadline = time.monotonic() + timeout
    next_report = 0.0
    while True:
        node_ids = sorted(grid.get_node_ids())
        if len(node_ids) >= needed:
            return node_ids
        if simulation:
            raise RunAborted(
                f"the simulated federation has {len(node_ids)} SuperNodes but the run config needs {needed} "
                "(min-available-nodes / min-train-nodes / min-evaluate-nodes): lower them with --run-config "
                f"or raise options.num-supernodes in pyproject.toml (a --federation-config override must restate "
                "every other option too, see README)"
            )
        now = time.monotonic()
        if now >= deadline:
            raise RunAborted(
                f"only {len(node_ids)} of the {needed} SuperNodes needed connected within node-wait-timeout="
                f"{timeout:g}s: start more SuperNodes, lower min-available-nodes, or raise node-wait-timeout"
            )
        if now >= next_report:
            logger.info(
                "Waiting for SuperNodes: %d connected, %d needed (giving up in %.0fs)",
                len(node_ids),
                needed,
                deadline - now,
            )
            next_report = now + 10.0
        time.sleep(0.5)


class RecordingFedAvg(FedAvg):
    """FedAvg that waits with a bound, names failing nodes, and hands each round to a recorder."""

    def __init__(
        self,
        *,
        recorder: RunRecorder,
        node_names: Mapping[int, str],
        node_wait_timeout: float,
        round_timeout: float,
        simulation: bool,
        **fedavg_args,
    ) -> None:
        super().__init__(**fedavg_args)
        self.recorder = recorder
        self.node_names = dict(node_names)
        self.node_wait_timeout = node_wait_timeout
        self.round_timeout = round_timeout
        self.simulation = simulation
        self._sent: list[Message] = []  # this stage's messages, to tell whose reply is missing
        self._reported: set[tuple[int, int]] = set()  # (round, node): name each failure once per round

    def _await_nodes(self, grid: Grid) -> None:
        needed = max(self.min_available_nodes, self.min_train_nodes, self.min_evaluate_nodes)
        wait_for_nodes(grid, needed, self.node_wait_timeout, simulation=self.simulation)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.recorder.begin_round()
        self._await_nodes(grid)
        return self._keep(super().configure_train(self.recorder.to_global(server_round), arrays, config, grid))

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._await_nodes(grid)
        return self._keep(super().configure_evaluate(self.recorder.to_global(server_round), arrays, config, grid))

    def _keep(self, messages: Iterable[Message]) -> list[Message]:
        self._sent = list(messages)
        return self._sent

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        round_number = self.recorder.to_global(server_round)
        ok = self._report_failures(round_number, "train", replies)
        if ok < self.min_train_nodes:
            raise RunAborted(
                f"round {round_number}: {ok} node(s) returned training results, fewer than "
                f"min-train-nodes={self.min_train_nodes}; fix the failing nodes (errors above), "
                "or lower min-train-nodes, then resume with resume-from"
            )
        arrays, metrics = super().aggregate_train(round_number, replies)
        if metrics is not None:
            self.recorder.record(metrics)
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        round_number = self.recorder.to_global(server_round)
        self._report_failures(round_number, "evaluate", replies)
        metrics = super().aggregate_evaluate(round_number, replies)
        if metrics is not None:
            self.recorder.record(metrics)
        return metrics

    def _report_failures(self, round_number: int, stage: str, replies: list[Message]) -> int:
        """One WARNING per failing or silent node and round; returns how many replies carry results."""
        by_node = replies_by_node(self._sent, replies)
        for node_id in dict.fromkeys([m.metadata.dst_node_id for m in self._sent] + list(by_node)):
            reply = by_node.get(node_id)
            if reply is None:
                reason = f"no reply within round-timeout={self.round_timeout:g}s"
            elif reply.has_error():
                reason = short_reason(reply.error.reason)
            else:
                continue
            if (round_number, node_id) not in self._reported:
                self._reported.add((round_number, node_id))
                logger.warning(
                    "round %d %s: node %s failed: %s",
                    round_number,
                    stage,
                    self.node_names.get(node_id, node_id),
                    reason,
                )
        return sum(not reply.has_error() for reply in replies)
