"""The hooks every strategy gets, in process: failures named once, replies matched to nodes, divergence stopped."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from support.messages import metadata, sent_to
from support.recorder import MemoryRecorder

from fedcifar_app.client.host import DATA_KEY, HOST_KEY
from fedcifar_app.compat import ErrorCode
from fedcifar_app.errors import RunAborted, TrainingDiverged
from fedcifar_app.logs import APP_LOGGER
from fedcifar_app.model import new_model
from fedcifar_app.server.divergence import RoundEvidence
from fedcifar_app.server.hooks import (
    Aggregation,
    StrategyHooks,
    check_finite,
    failed_nodes,
    replies_by_node,
    short_reason,
    wait_for_nodes,
    with_app_hooks,
)

SUPERLINK_NODE_ID = 1  # the SuperLink answers for a dead SuperNode under its own id

# What a ClientApp exception looks like when it reaches the ServerApp (flwr 1.25's vce_api / run_clientapp).
CLIENT_APP_EXCEPTION = (
    "<class 'flwr.clientapp.client_app.ClientAppException'>:<'\nException ClientAppException occurred. "
    "Message: data-path='/d' holds no images'>"
)


def ok_reply(message: Message, **metrics: float) -> Message:
    return Message(RecordDict({"metrics": MetricRecord({"num-examples": 10, **metrics})}), reply_to=message)


def error_reply(message: Message, reason: str, src: int | None = None) -> Message:
    """A failed reply to ``message``, from its node or (``src``) from another one, such as the SuperLink."""
    error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason)
    if src is None:
        return Message(error, reply_to=message)
    answered = message.metadata
    return Message(
        error=error,
        metadata=metadata(src_node_id=src, dst_node_id=answered.src_node_id, reply_to_message_id=answered.message_id),
    )


def test_short_reason_keeps_the_clientapp_message_of_flowers_traceback():
    assert short_reason(CLIENT_APP_EXCEPTION) == "data-path='/d' holds no images"
    assert short_reason("<class 'ZeroDivisionError'>:<'division by zero'>") == "ZeroDivisionError: division by zero"
    assert short_reason("plain one-liner\n") == "plain one-liner"  # this app's own error replies
    assert short_reason("") == "unknown error"


def test_a_reply_from_the_superlink_is_matched_to_the_node_it_answers_for():
    sent = sent_to(5, 6, 7)
    replies = [ok_reply(sent[0]), error_reply(sent[1], "NODE_UNAVAILABLE", src=SUPERLINK_NODE_ID)]
    by_node = replies_by_node(sent, replies)
    assert set(by_node) == {5, 6}  # not 1: the SuperLink's own id never stands for a node
    assert by_node[6].has_error()
    failures = failed_nodes(sent, replies, round_timeout=30)
    assert failures == {6: "NODE_UNAVAILABLE", 7: "no reply within round-timeout=30s"}


DATA_CHECK_NAMES = {5: "partition 0/3", 6: "partition 1/3", 7: "partition 2/3"}


def hooked_fedavg(
    recorder: MemoryRecorder, min_train_nodes: int = 2, node_names: dict[int, str] = DATA_CHECK_NAMES
) -> FedAvg:
    hooks = StrategyHooks(
        recorder=recorder,
        needed_nodes=3,
        min_train_nodes=min_train_nodes,
        node_wait_timeout=1,
        round_timeout=30,
        simulation=True,
        node_names=node_names,
    )
    return with_app_hooks(FedAvg)(app_hooks=hooks, min_train_nodes=min_train_nodes, min_available_nodes=3)


def trained_reply(message: Message, weights, loss: float, data: str | None = None) -> Message:
    """A training result; ``data``: the partition the ClientApp names in its reply's "info" record."""
    content = RecordDict(
        {"arrays": ArrayRecord(weights), "metrics": MetricRecord({"num-examples": 10, "train-loss": loss})}
    )
    if data is not None:
        content["info"] = ConfigRecord({DATA_KEY: data, HOST_KEY: "localhost"})
    return Message(content, reply_to=message)


def test_failing_nodes_are_named_once_per_round_and_results_still_aggregate(caplog):
    recorder = MemoryRecorder(offset=4)  # a resumed run: Flower's round 1 is the run's round 5
    strategy = hooked_fedavg(recorder)
    weights = new_model(0).state_dict()
    sent = sent_to(5, 6, 7)
    strategy.app_hooks.sent = sent
    replies = [trained_reply(sent[0], weights, 1.0), trained_reply(sent[1], weights, 3.0), error_reply(sent[2], "x")]
    with caplog.at_level(logging.WARNING, logger=APP_LOGGER):
        arrays, metrics = strategy.aggregate_train(1, replies)
        strategy.app_hooks.report_failures(5, "train", replies)  # the same failure again: not repeated
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == ["round 5 train: node partition 2/3 failed: x"]
    assert metrics["train-loss"] == pytest.approx(2.0) and recorder.metrics["train-loss"] == pytest.approx(2.0)
    assert arrays is not None


def test_an_aggregation_does_not_depend_on_the_order_in_which_replies_arrive():
    """Float sums follow the order of their terms: the same replies in another arrival order must give
    bit-identical weights, or two runs with one seed (or a run and its resume) drift apart."""
    generator = torch.Generator().manual_seed(0)
    sent = sent_to(5, 6, 7)
    updates = [{"w": torch.randn(1000, generator=generator) * 10 ** (3 * k)} for k in range(3)]

    def aggregate(order: list[int]) -> torch.Tensor:
        strategy = hooked_fedavg(MemoryRecorder())
        strategy.app_hooks.sent = sent
        replies = [trained_reply(sent[i], updates[i], 1.0) for i in order]
        arrays, _ = strategy.aggregate_train(1, replies)
        assert arrays is not None
        return arrays.to_torch_state_dict()["w"]

    first = aggregate([0, 1, 2])
    assert all(torch.equal(first, aggregate(order)) for order in ([2, 1, 0], [1, 2, 0], [2, 0, 1]))


def test_nodes_outside_the_data_check_are_aggregated_in_the_order_of_their_data():
    """Simulated nodes get random ids in every run, and the data check names only a sample of them (20
    of 1,000): the replies' own data labels must order the sum, so two runs with one seed agree."""
    generator = torch.Generator().manual_seed(0)
    updates = [{"w": torch.randn(1000, generator=generator) * 10 ** (3 * k)} for k in range(3)]

    def aggregate(node_ids: tuple[int, int, int]) -> torch.Tensor:
        """Partition k on node ``node_ids[k]``; none of the nodes was in the data check's sample."""
        strategy = hooked_fedavg(MemoryRecorder(), node_names={})
        sent = sent_to(*node_ids)
        strategy.app_hooks.sent = sent
        replies = [trained_reply(sent[k], updates[k], 1.0, data=f"partition {k}/3") for k in range(3)]
        arrays, _ = strategy.aggregate_train(1, replies)
        assert arrays is not None
        return arrays.to_torch_state_dict()["w"]

    first = aggregate((5, 6, 7))
    assert all(torch.equal(first, aggregate(ids)) for ids in ((9, 3, 7), (7, 6, 5), (2, 8, 4)))


def test_too_few_training_results_abort_the_round_with_the_fix():
    strategy = hooked_fedavg(MemoryRecorder(), min_train_nodes=3)
    sent = sent_to(5, 6, 7)
    strategy.app_hooks.sent = sent
    weights = new_model(0).state_dict()
    replies = [trained_reply(sent[0], weights, 1.0), trained_reply(sent[1], weights, 1.0), error_reply(sent[2], "x")]
    with pytest.raises(
        RunAborted, match=r"round 1: 2 node\(s\) returned training results, fewer than min-train-nodes=3"
    ):
        strategy.aggregate_train(1, replies)


def test_nan_weights_or_loss_stop_the_round_before_anything_is_recorded():
    recorder = MemoryRecorder()
    strategy = hooked_fedavg(recorder)
    sent = sent_to(5, 6)
    strategy.app_hooks.sent = sent
    weights = new_model(0).state_dict()
    broken = {key: torch.full_like(value, math.nan) for key, value in weights.items()}
    replies = [trained_reply(sent[0], weights, 1.0), trained_reply(sent[1], broken, math.nan)]
    with pytest.raises(TrainingDiverged, match=r"round 1: training diverged \(train-loss nan, aggregated weights"):
        strategy.aggregate_train(1, replies)
    assert recorder.metrics == {}
    check_finite(1, ArrayRecord(weights), MetricRecord({"train-loss": 1.0}))  # finite: no error
    with pytest.raises(TrainingDiverged, match="train-loss inf"):
        check_finite(2, ArrayRecord(weights), MetricRecord({"train-loss": math.inf}))


def test_an_aggregation_sums_up_as_distances_from_the_global_model_sent():
    messages = sent_to(5, 6, 7)
    replies = [
        trained_reply(messages[0], {"w": torch.full((4,), 1.0)}, 0.5),
        trained_reply(messages[1], {"w": torch.full((4,), 3.0)}, math.nan),
        error_reply(messages[2], "x"),
    ]
    aggregation = Aggregation(ArrayRecord({"w": torch.zeros(4)}), replies, ArrayRecord({"w": torch.full((4,), 50.0)}))
    assert aggregation.evidence() == RoundEvidence(
        client_losses_finite=False, client_step=6.0, server_step=100.0, num_weights=4
    )


def test_configure_train_begins_the_round_and_sends_the_global_round_number():
    class Grid:
        def get_node_ids(self):
            return [5, 6, 7]

        def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
            return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    recorder = MemoryRecorder(offset=2)
    strategy = hooked_fedavg(recorder)
    messages = list(strategy.configure_train(1, ArrayRecord(new_model(0).state_dict()), ConfigRecord({}), Grid()))
    assert recorder.began == 1 and strategy.app_hooks.sent == messages
    assert {int(m.content["config"]["server-round"]) for m in messages} == {3}  # seeds follow the run's round


def test_simulation_waits_for_flowers_late_node_registration_but_not_for_a_real_shortfall():
    class LateGrid:
        """Flower's simulation registers its nodes a moment after the ServerApp thread starts."""

        def __init__(self, count: int, empty_polls: int) -> None:
            self.count, self.empty_polls = count, empty_polls

        def get_node_ids(self):
            self.empty_polls -= 1
            return [] if self.empty_polls >= 0 else list(range(1, self.count + 1))

    assert wait_for_nodes(LateGrid(3, empty_polls=3), 3, timeout=60, simulation=True) == [1, 2, 3]
    with pytest.raises(RunAborted, match="the simulated federation has 2 SuperNodes but the run config needs 3"):
        wait_for_nodes(LateGrid(2, empty_polls=3), 3, timeout=60, simulation=True)
