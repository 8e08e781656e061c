"""Before round 1: ask the nodes to load their data, so bad data fails the run at start, not mid-run."""

from __future__ import annotations

import logging
import random
from collections import Counter

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from ..client.host import DATA_KEY
from ..compat import MessageType
from ..config import RunConfig
from ..errors import RunAborted
from ..logs import APP_LOGGER
from ..runs.metrics import number, scalars
from ..seeds import derive_seed
from .hooks import replies_by_node, short_reason
from .hosts import HostLedger, reply_host

logger = logging.getLogger(APP_LOGGER)

SIMULATION_DATA_CHECK_NODES = 20  # a sample: simulated nodes share one dataset and one config


def check_node_data(
    grid: Grid, node_ids: list[int], config: RunConfig, *, simulation: bool, hosts: HostLedger | None = None
) -> dict[int, str]:
    """Ask the nodes to load their data before round 1; return node id -> what data it holds.

    Deployed nodes each hold their own data, so every one is asked. Simulated nodes all partition
    the same dataset under the same config, so a seeded sample of max(20, min-train-nodes,
    min-evaluate-nodes) stands for them: asking 1,000 nodes took 22 s of start-up, 10,000 far
    more (benchmarks/README.md); a node outside the sample that fails is named in its round.
    Nodes whose data fails are named and left out of the count; too few usable nodes stops
    the run here, before any training. Each reply names the host it ran on (``hosts`` counts them):
    with more than one, the log line says how the sampled nodes spread over them.
    """
    asked = node_ids
    sample_size = max(SIMULATION_DATA_CHECK_NODES, config.min_train_nodes, config.min_evaluate_nodes)
    if simulation and len(node_ids) > sample_size:
        asked = sorted(random.Random(derive_seed(config.seed, "data-check")).sample(node_ids, sample_size))
    messages = [
        Message(
            RecordDict({"config": ConfigRecord({"server-round": 0})}),
            message_type=MessageType.QUERY,
            dst_node_id=node_id,
        )
        for node_id in asked
    ]
    replies = replies_by_node(messages, grid.send_and_receive(messages, timeout=config.round_timeout))
    if hosts is not None:
        hosts.note(replies.values())
    names, failures, train_sizes, answered = {}, [], [], []
    for node_id in asked:
        reply = replies.get(node_id)
        if reply is None:
            failures.append(f"node {node_id}: no answer within round-timeout={config.round_timeout:g}s")
        elif reply.has_error():
            lost = hosts.lost_actor(reply.error.reason) if hosts is not None else None
            where = f"its ClientApp actor on {lost} is gone, " if lost else ""  # a host left the Ray cluster
            failures.append(f"node {node_id}: {where}{short_reason(reply.error.reason)}")
        else:
            names[node_id] = str(reply.content["info"][DATA_KEY])
            train_sizes.append(int(number(reply.content.metric_records["metrics"], "num-train")))
            answered.append(reply)
    needed = max(config.min_train_nodes, config.min_evaluate_nodes)
    if len(names) < needed:
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        raise RunAborted(
            f"data check failed on {len(failures)} of {len(asked)} nodes, {len(names)} usable but "
            f"min-train-nodes/min-evaluate-nodes need {needed}: {failures[0]}{more}"
        )
    for failure in failures:
        logger.warning("data check: %s; the run goes on, and this node fails its rounds until it is fixed", failure)
    sampled = f" (a sample of the {len(node_ids)})" if len(asked) < len(node_ids) else ""
    logger.info(
        "Data check: %d nodes ready%s%s, %d training samples (%d to %d per node)",
        len(names),
        sampled,
        spread_over_hosts(answered),
        sum(train_sizes),
        min(train_sizes),
        max(train_sizes),
    )
    return names


def spread_over_hosts(replies: list[Message]) -> str:
    """`` on 2 hosts (w1 (10.0.0.2): 3 nodes, 1 torch thread; w2 ...)`` when the replies came from
    several hosts (a Ray cluster: the engine ran each check on an actor of some host), else ""."""
    nodes: Counter[str] = Counter()
    threads: dict[str, set[int]] = {}
    for reply in replies:
        host = (reply_host(reply) or ("unknown host", ""))[0]
        nodes[host] += 1
        reported = scalars(reply.content.metric_records["metrics"]).get("torch-threads")
        threads.setdefault(host, set()).update([int(reported)] if reported is not None else [])
    if len(nodes) < 2:
        return ""
    per_host = [f"{host}: {count} node{'s' * (count > 1)}" for host, count in sorted(nodes.items())]
    for index, host in enumerate(sorted(nodes)):
        if threads[host]:
            counts = sorted(threads[host])
            per_host[index] += f", {'/'.join(map(str, counts))} torch thread{'s' * (counts[-1] > 1)}"
    return f" on {len(nodes)} hosts ({'; '.join(per_host)})"
