"""ClientApp: thin handlers over the Flower-free data and training code."""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod

from . import training
from .compat import ErrorCode
from .config import ConfigError, DpMode, NodeData, RunConfig
from .data import DataError, NodeSplits, load_node_data
from .metrics import EVAL_ACCURACY, EVAL_LOSS, NUM_EXAMPLES, TRAIN_LOSS
from .model import Net
from .seeds import derive_seed
from .threads import size_torch_threads

app = ClientApp()
logger = logging.getLogger("flwr")

# Flower imports this module in the simulation process just before it starts Ray, whose
# FutureWarning about GPU environment variables would otherwise open every run. Setting
# RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO instead would change which GPUs CPU-only clients see.
warnings.filterwarnings("ignore", message=r"Tip: In future versions of Ray", category=FutureWarning)

DATA_CHECK = "data-check"  # the query the ServerApp sends before round 1


@dataclass(frozen=True)
class NodeJob:
    """Everything one handler needs: validated config, this node's data, a model with the global weights."""

    config: RunConfig
    node: NodeData
    data: NodeSplits
    device: torch.device
    model: Net

    @classmethod
    def from_message(cls, msg: Message, context: Context) -> NodeJob:
        config = RunConfig.from_run_config(context.run_config)
        node = NodeData.from_node_config(context.node_config)
        size_torch_threads(context.node_config)  # this process's share of the cores (threads.py)
        data = load_node_data(config, node)
        device = training.pick_device(config.device)
        model = Net()
        if "arrays" in msg.content:
            model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        return cls(config, node, data, device, model)


def replies_user_errors(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """Bad config or data becomes a one-line error reply the server can show, not a traceback wall."""

    @functools.wraps(handler)
    def wrapper(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except (ConfigError, DataError) as err:
            logger.warning("%s: %s", type(err).__name__, err)  # the server reports it as the run's ERROR
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{err}"), reply_to=msg)

    return wrapper


def client_dp_clipping(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Flower's ``fixedclipping_mod``, only in runs with dp='client': the mod demands a clipping norm
    that only ``DifferentialPrivacyClientSideFixedClipping`` sends, so every other run bypasses it."""
    if context.run_config.get("dp") == DpMode.CLIENT.value:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


@app.train(mods=[client_dp_clipping])
@replies_user_errors
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this node's training split."""
    job = NodeJob.from_message(msg, context)
    settings = msg.content["config"]
    server_round = int(settings["server-round"])
    train_loss = training.train(
        job.model,
        job.data.train,
        epochs=int(settings["local-epochs"]),
        batch_size=int(settings["batch-size"]),
        learning_rate=float(settings["learning-rate"]),
        device=job.device,
        # Seeded by (seed, round, node) so any process running this node repeats it exactly.
        seed=derive_seed(job.config.seed, "train", server_round, job.node.label),
        proximal_mu=float(settings.get("proximal-mu", 0.0)),  # FedProx sends it; the term is ours to add
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord(training.get_weights(job.model)),
            "metrics": MetricRecord({TRAIN_LOSS: train_loss, NUM_EXAMPLES: len(job.data.train)}),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
@replies_user_errors
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on this node's validation split."""
    job = NodeJob.from_message(msg, context)
    result = training.evaluate(job.model, job.data.val, job.device)
    metrics = MetricRecord({EVAL_LOSS: result.loss, EVAL_ACCURACY: result.accuracy, NUM_EXAMPLES: result.num_examples})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


@app.query()
@replies_user_errors
def query(msg: Message, context: Context) -> Message:
    """Before round 1 the server asks each node to load its data: bad data fails there, not mid-run."""
    job = NodeJob.from_message(msg, context)
    metrics = MetricRecord(
        {"num-train": len(job.data.train), "num-val": len(job.data.val), "torch-threads": torch.get_num_threads()}
    )
    info = ConfigRecord({"data": job.node.label, "device": str(job.device)})
    return Message(content=RecordDict({"metrics": metrics, "info": info}), reply_to=msg)
