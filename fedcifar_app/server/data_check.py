"""Before round 1: ask the nodes to load their data, so bad data fails the run at start, not mid-run."""

from __future__ import annotations

import logging
import random

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from ..compat import MessageType
from ..config import RunConfig
from ..errors import RunAborted
from ..logs import APP_LOGGER
from ..runs.metrics import number
from ..seeds import derive_seed
from .hooks import replies_by_node, short_reason

logger = logging.getLogger(APP_LOGGER)

SIMULATION_DATA_CHECK_NODES = 20  # a sample: simulated nodes share one dataset and one config


def check_node_data(grid: Grid, node_ids: list[int], config: RunConfig, *, simulation: bool) -> dict[int, str]:
    """Ask the nodes to load their data before round 1; return node id -> what data it holds.

    Deployed nodes each hold their own data, so every one is asked. Simulated nodes all partition
    the same dataset under the same config, so a seeded sample of max(20, min-train-nodes,
    min-evaluate-nodes) stands for them: asking 1,000 nodes took 22 s of start-up, 10,000 far
    more (benchmarks/README.md); a node outside the sample that fails is named in its round.
    Nodes whose data fails are named and left out of the count; too few usable nodes stops
    the run here, before any training.
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
    names, failures, train_sizes = {}, [], []
    for node_id in asked:
        reply = replies.get(node_id)
        if reply is None:
            failures.append(f"node {node_id}: no answer within round-timeout={config.round_timeout:g}s")
        elif reply.has_error():
            failures.append(f"node {node_id}: {short_reason(reply.error.reason)}")
        else:
            names[node_id] = str(reply.content["info"]["data"])
            train_sizes.append(int(number(reply.content.metric_records["metrics"], "num-train")))
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
        "Data check: %d nodes ready%s, %d training samples (%d to %d per node)",
        len(names),
        sampled,
        sum(train_sizes),
        min(train_sizes),
        max(train_sizes),
    )
    return names
