"""Which host served a reply, and a lost Ray actor named by its host in one line (in process; the
Ray cluster itself is tests/test_cluster.py)."""

from __future__ import annotations

import logging
import socket

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from support.messages import sent_to
from support.recorder import MemoryRecorder

from fedcifar_app.client.host import this_host
from fedcifar_app.compat import ErrorCode
from fedcifar_app.config import RunConfig
from fedcifar_app.errors import RunAborted
from fedcifar_app.logs import APP_LOGGER
from fedcifar_app.model import new_model
from fedcifar_app.server.app import lost_actor_tracebacks
from fedcifar_app.server.data_check import check_node_data, spread_over_hosts
from fedcifar_app.server.hooks import StrategyHooks, with_app_hooks
from fedcifar_app.server.hosts import HostLedger

W1, W2 = "w1 (10.201.18.2)", "w2 (10.201.18.3)"
ACTOR_1, ACTOR_2 = "3de5437a32affe437a438cb301000000", "6b78ea4484cdbf980465f75201000000"
# What Flower 1.25's engine replies when the actor of a message is gone (vce_api: str(type) + str(ex)),
# as seen with a worker's raylet killed: at once "unavailable", once Ray has declared the node dead "died".
UNAVAILABLE = (
    f"<class 'ray.exceptions.ActorUnavailableError'>:<'The actor {ACTOR_2} is unavailable: The actor is "
    "temporarily unavailable: RpcError: RPC Error message: Socket closed; RPC Error details:  rpc_code: 14. "
    "The task may or may not have been executed on the actor.'>"
)
DIED = (
    "<class 'ray.exceptions.ActorDiedError'>:<'The actor died unexpectedly before finishing this task.\n"
    "\tclass_name: ClientAppActor\n\tactor_id: {actor}\n\tpid: 6153\n\tnamespace: d7d1\n\tip: 10.201.18.3\n"
    "The actor died because its node has died. Node Id: f13d\n"
    "\tthe actor's node was terminated unexpectedly: health check failed due to missing too many heartbeats'>"
)


def served(message: Message, host: str, actor: str = "", **metrics: float) -> Message:
    info = ConfigRecord({"host": host, **({"ray-actor": actor} if actor else {})})
    arrays = ArrayRecord(new_model(0).state_dict())
    content = RecordDict(
        {"arrays": arrays, "metrics": MetricRecord({"num-examples": 10, "train-loss": 1.0, **metrics}), "info": info}
    )
    return Message(content, reply_to=message)


def lost(message: Message, reason: str) -> Message:
    return Message(Error(code=ErrorCode.UNKNOWN, reason=reason), reply_to=message)


def test_outside_ray_a_reply_names_this_machine_only():
    assert this_host() == {"host": socket.gethostname()}


def test_the_ledger_counts_replies_per_host_and_knows_where_each_actor_lives():
    sent = sent_to(1, 2, 3, 4)
    ledger = HostLedger()
    ledger.note([served(sent[0], W1, ACTOR_1), served(sent[1], W2, ACTOR_2), served(sent[2], W2, ACTOR_2)])
    ledger.note([lost(sent[3], "a ClientApp error"), Message(RecordDict(), reply_to=sent[3])])  # no host: skipped
    assert ledger.summary() == f"2 hosts: {W1} 1 replies, {W2} 2 replies"
    assert ledger.lost_actor(UNAVAILABLE) == f"host {W2}"  # the actor id, from its earlier replies
    assert ledger.lost_actor(DIED.format(actor=ACTOR_2)) == f"host {W2}"
    assert ledger.lost_actor(DIED.format(actor="f" * 32)) == f"host {W2}"  # never replied: Ray's "ip:" line
    assert ledger.lost_actor("<class 'ZeroDivisionError'>:<'division by zero'>") is None
    one_host = HostLedger()
    one_host.note([served(sent[0], W1)])
    assert one_host.summary() is None  # one machine: nothing to say
    assert one_host.lost_actor(UNAVAILABLE) == "a host this run never heard from"


def hooked_fedavg(ledger: HostLedger, resume: str) -> FedAvg:
    hooks = StrategyHooks(
        recorder=MemoryRecorder(),
        needed_nodes=3,
        min_train_nodes=1,
        node_wait_timeout=1,
        round_timeout=30,
        simulation=True,
        hosts=ledger,
        resume_hint=lambda: resume,
    )
    return with_app_hooks(FedAvg)(app_hooks=hooks, min_train_nodes=1, min_available_nodes=3)


def test_a_lost_actor_ends_the_run_in_one_line_naming_its_host_and_the_resume_command():
    """Flower's engine keeps a dead actor in its pool, so the round's other results do not save the
    run: it ends with the host named and the command that resumes on the hosts that are left."""
    ledger = HostLedger()
    sent = sent_to(5, 6, 7)
    ledger.note([served(sent[0], W1, ACTOR_1), served(sent[1], W2, ACTOR_2)])  # the data check
    strategy = hooked_fedavg(ledger, "; resume with: flwr run . ray-cluster --run-config \"resume-from='/o/r'\"")
    strategy.app_hooks.sent = sent
    replies = [served(sent[0], W1, ACTOR_1), served(sent[1], W1, ACTOR_1), lost(sent[2], UNAVAILABLE)]
    with pytest.raises(RunAborted) as raised:
        strategy.aggregate_train(2, replies)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"round 2 train: the ClientApp actor on host {W2} is gone (ActorUnavailableError: ")
    assert "does not replace lost actors" in message
    assert message.endswith("; resume with: flwr run . ray-cluster --run-config \"resume-from='/o/r'\"")
    assert ledger.replies[W1] == 3  # the round's results were counted before it ended

    nothing_checkpointed = hooked_fedavg(HostLedger(), "")
    nothing_checkpointed.app_hooks.sent = sent
    with pytest.raises(RunAborted, match=r"so the run stops here; start it again$"):
        nothing_checkpointed.aggregate_evaluate(1, [lost(sent[0], DIED.format(actor=ACTOR_1))])


def test_the_data_check_line_says_how_the_nodes_spread_over_hosts():
    sent = sent_to(1, 2, 3)
    replies = [
        served(sent[0], W1, **{"torch-threads": 1}),
        served(sent[1], W2, **{"torch-threads": 2}),
        served(sent[2], W2, **{"torch-threads": 2}),
    ]
    assert spread_over_hosts(replies) == f" on 2 hosts ({W1}: 1 node, 1 torch thread; {W2}: 2 nodes, 2 torch threads)"
    assert spread_over_hosts(replies[:1]) == ""


def test_flowers_tracebacks_for_a_lost_actor_stay_out_of_the_log_others_stay():
    def record(module: str, msg: object, level: int = logging.ERROR) -> logging.LogRecord:
        return logging.LogRecord("flwr", level, f"/x/{module}.py", 1, msg, None, None)

    actor_died = type("ActorDiedError", (Exception,), {})  # Ray's class name; `log(ERROR, ex)` logs the exception
    assert not lost_actor_tracebacks(record("vce_api", actor_died("The actor died unexpectedly")))
    assert not lost_actor_tracebacks(record("vce_api", "Traceback ...\nray.exceptions.ActorUnavailableError: gone"))
    assert lost_actor_tracebacks(record("vce_api", "Traceback ...\nZeroDivisionError: division by zero"))
    assert lost_actor_tracebacks(record("run_simulation", "Traceback ...\nray.exceptions.ActorDiedError: x"))
    assert lost_actor_tracebacks(record("vce_api", "ActorDiedError", level=logging.WARNING))


def test_a_node_whose_actor_was_lost_during_the_data_check_is_named_with_its_host(caplog):
    class Grid:
        def send_and_receive(self, messages, timeout):
            replies = []
            for number, message in enumerate(messages):
                message.metadata.__dict__["_message_id"] = f"query-{number}"  # as Flower's grids do
                if number == 0:
                    replies.append(lost(message, UNAVAILABLE))
                    continue
                host, actor = (W1, ACTOR_1) if number % 2 else (W2, ACTOR_2)
                info = ConfigRecord({"data": f"partition {number}", "host": host, "ray-actor": actor})
                metrics = MetricRecord({"num-train": 40, "torch-threads": 1})
                replies.append(Message(RecordDict({"metrics": metrics, "info": info}), reply_to=message))
            return replies

    config = RunConfig.from_run_config({"dataset": "synthetic", "min-train-nodes": 2, "min-evaluate-nodes": 1})
    ledger = HostLedger()
    with caplog.at_level(logging.INFO, logger=APP_LOGGER):
        names = check_node_data(Grid(), [11, 12, 13, 14], config, simulation=True, hosts=ledger)
    assert sorted(names) == [12, 13, 14]
    lines = [record.getMessage() for record in caplog.records]
    assert f"data check: node 11: its ClientApp actor on host {W2} is gone, ActorUnavailableError: " in lines[0]
    assert lines[1].startswith(f"Data check: 3 nodes ready on 2 hosts ({W1}: 2 nodes, 1 torch thread; {W2}: 1 node")
    assert ledger.replies == {W1: 2, W2: 1}
