"""ClientApp: thin handlers over the Flower-free data and training code."""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod

from ..compat import ErrorCode
from ..config import DpMode
from ..errors import ConfigError, DataError
from ..runs.metrics import EVAL_ACCURACY, EVAL_LOSS, NUM_EXAMPLES, TRAIN_LOSS, number
from .host import DATA_KEY, HOST_KEY, on_other_hosts, this_host

if TYPE_CHECKING:
    from .node_job import NodeJob

# No torch (nor any module that imports it) at module level: see node_job.py for why.
app = ClientApp()
logger = logging.getLogger("flwr")

# Flower imports this module in the simulation process just before it starts Ray, whose
# FutureWarning about GPU environment variables would otherwise open every run. Setting
# RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO instead would change which GPUs CPU-only clients see.
warnings.filterwarnings("ignore", message=r"Tip: In future versions of Ray", category=FutureWarning)


def job_for(msg: Message, context: Context) -> NodeJob:
    """This node's job for ``msg``; the first call in a process imports torch and the ML code."""
    from .node_job import NodeJob  # first: Flower's to_torch_state_dict needs torch imported already

    arrays = msg.content.array_records.get("arrays")
    weights = arrays.to_torch_state_dict() if arrays is not None else None
    return NodeJob.build(context.run_config, context.node_config, weights)


def replies_user_errors(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """Bad config or data becomes a one-line error reply the server can show, not a traceback wall."""

    @functools.wraps(handler)
    def wrapper(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except (ConfigError, DataError) as err:
            logger.warning("%s: %s", type(err).__name__, err)  # the server reports it as the run's ERROR
            where = f" (on host {this_host()[HOST_KEY]})" if on_other_hosts() else ""  # a path may differ per host
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{err}{where}"), reply_to=msg)

    return wrapper


def served_by(job: NodeJob) -> ConfigRecord:
    """Which data (the server orders replies by it before aggregating) and which host (and Ray actor)
    this reply comes from; the server counts replies per host."""
    facts: dict[str, Any] = {DATA_KEY: job.node.label, **this_host()}
    return ConfigRecord(facts)


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
    job = job_for(msg, context)
    settings = msg.content.config_records["config"]
    weights, train_loss = job.train(
        int(number(settings, "server-round")),
        epochs=int(number(settings, "local-epochs")),
        batch_size=int(number(settings, "batch-size")),
        learning_rate=number(settings, "learning-rate"),
        proximal_mu=number(settings, "proximal-mu")
        if "proximal-mu" in settings
        else 0.0,  # FedProx sends it; the term is ours
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord(weights),
            "metrics": MetricRecord({TRAIN_LOSS: train_loss, NUM_EXAMPLES: len(job.data.train)}),
            "info": served_by(job),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
@replies_user_errors
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on this node's validation split."""
    job = job_for(msg, context)
    result = job.evaluate()
    metrics = MetricRecord({EVAL_LOSS: result.loss, EVAL_ACCURACY: result.accuracy, NUM_EXAMPLES: result.num_examples})
    return Message(content=RecordDict({"metrics": metrics, "info": served_by(job)}), reply_to=msg)


@app.query()
@replies_user_errors
def query(msg: Message, context: Context) -> Message:
    """Before round 1 the server asks each node to load its data: bad data fails there, not mid-run."""
    facts = job_for(msg, context).describe()
    metrics = MetricRecord({key: facts[key] for key in ("num-train", "num-val", "torch-threads")})
    info = ConfigRecord({key: facts[key] for key in (DATA_KEY, "device")} | this_host())
    return Message(content=RecordDict({"metrics": metrics, "info": info}), reply_to=msg)
