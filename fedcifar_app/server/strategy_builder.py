"""Which Flower strategy aggregates the run, built from the run config in one place.

``build_strategy`` takes Flower's own class for ``strategy`` (``flwr.serverapp.strategy``), with the
constructor arguments the strategy table maps the run-config keys to, wraps it in Flower's DP wrapper
when ``dp`` is on, and gives the outermost object this app's hooks (``hooks.with_app_hooks``). ``server_state`` / ``restore_server_state`` carry what a
strategy keeps between rounds (server optimizer moments, FedAvgM momentum, the privacy
accountant) through the checkpoint, so a resumed run continues it instead of restarting it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp import strategy as flower

from ..config import DpMode, RunConfig
from ..errors import ConfigError
from ..runs.metrics import EPSILON, NUM_EXAMPLES
from ..strategy_table import FLOWER_DEFAULT, StrategySpec
from .hooks import StrategyHooks, with_app_hooks
from .privacy import PrivacyAccountant

DP_WRAPPERS: dict[DpMode, type] = {
    DpMode.CENTRAL: flower.DifferentialPrivacyServerSideFixedClipping,
    DpMode.CLIENT: flower.DifferentialPrivacyClientSideFixedClipping,
}


def flower_class(spec: StrategySpec) -> type:
    """The strategy's class in ``flwr.serverapp.strategy``."""
    return getattr(flower, spec.flower_class)


def strategy_arguments(config: RunConfig) -> dict[str, Any]:
    """The Flower constructor's arguments; keys left at "Flower's default" are not passed, so Flower's own apply."""
    arguments: dict[str, Any] = {
        "fraction_train": config.fraction_train,
        "fraction_evaluate": config.fraction_evaluate,
        "min_train_nodes": config.min_train_nodes,
        "min_evaluate_nodes": config.min_evaluate_nodes,
        "min_available_nodes": config.min_available_nodes,
        "weighted_by_key": NUM_EXAMPLES,
    }
    spec, values = config.strategy_spec, config.to_run_config()
    for key, argument in spec.arguments.items():
        if not (key in spec.flower_defaults and values[key] == FLOWER_DEFAULT):
            arguments[argument] = values[key]
    return arguments


def nodes_sampled(config: RunConfig, num_nodes: int) -> int:
    """How many nodes train each round: Flower's rule (fraction of the connected ones, at least min-train-nodes)."""
    return min(num_nodes, max(int(num_nodes * config.fraction_train), config.min_train_nodes))


if TYPE_CHECKING:  # the type checker reads the mixin as going before a DP wrapper (both share their hooks)
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping as _FlowerDpWrapper
else:
    _FlowerDpWrapper = object


class DpAccounting(_FlowerDpWrapper):
    """Mixin before a Flower DP wrapper: after each round whose update was released (noised), account it."""

    def __init__(
        self,
        *args: Any,
        accountant: PrivacyAccountant,
        sampling_rate: float,
        on_epsilon: Callable[[float], None],
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.accountant = accountant
        self.sampling_rate = sampling_rate
        self.on_epsilon = on_epsilon

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None:  # Flower released a noised mean: this round spent privacy
            self.accountant.step(self.noise_multiplier, self.sampling_rate)
        self.on_epsilon(self.accountant.epsilon())
        return arrays, metrics


def build_strategy(
    config: RunConfig, hooks: StrategyHooks, num_nodes: int, resumed_state: dict[str, Any] | None = None
) -> Any:
    """The run's strategy with this app's hooks; a resumed run passes its checkpoint's ``server_state``."""
    sampled = nodes_sampled(config, num_nodes)
    check_nodes_per_round(config, sampled)
    aggregator = flower_class(config.strategy_spec)
    if config.dp is DpMode.OFF:
        strategy = with_app_hooks(aggregator)(app_hooks=hooks, **strategy_arguments(config))
    else:
        accountant = PrivacyAccountant(delta=config.dp_delta)
        if resumed_state is not None:
            if "privacy" not in resumed_state:
                raise ConfigError(
                    "run-config resume-from: the checkpoint holds no privacy accountant, so epsilon would restart "
                    "at 0: resume a folder written by a dp run of this app, or start a new run"
                )
            accountant = PrivacyAccountant.from_state(resumed_state["privacy"])
        wrapper = DP_WRAPPERS[config.dp]
        accounted = type(f"Accounted{wrapper.__name__}", (DpAccounting, wrapper), {})
        strategy = with_app_hooks(accounted)(
            aggregator(**strategy_arguments(config)),
            config.dp_noise_multiplier,
            config.dp_clipping_norm,
            sampled,
            app_hooks=hooks,
            accountant=accountant,
            sampling_rate=sampled / num_nodes,
            on_epsilon=lambda epsilon: hooks.recorder.add_client_metrics({EPSILON: epsilon}),
        )
    if resumed_state is not None:
        restore_server_state(strategy, config, resumed_state)
    return strategy


def check_nodes_per_round(config: RunConfig, sampled: int) -> None:
    """A strategy that needs more nodes per round than ``sampled`` is refused before round 1, in one line."""
    spec = config.strategy_spec
    if spec.nodes_per_round is None:
        return
    values = config.to_run_config()
    needed = spec.nodes_per_round.count(values)
    if sampled < needed:
        keys = " ".join(f"{key}={values[key]}" for key in spec.arguments)
        raise ConfigError(
            f"run-config {keys}: {spec.flower_class} needs at least {spec.nodes_per_round.rule} = {needed} nodes "
            f"per round but {sampled} train each round: lower {' / '.join(spec.arguments)} or add nodes"
        )


def _aggregator(strategy: Any) -> Any:
    """The Flower strategy that aggregates (a DP wrapper keeps it in ``.strategy``)."""
    return getattr(strategy, "strategy", strategy)


def _to_tensors(value: Any) -> Any:
    """numpy -> torch, so the checkpoint loads with ``weights_only=True``."""
    if isinstance(value, dict):
        return {key: torch.from_numpy(np.array(array)) for key, array in value.items()}
    if isinstance(value, list):
        return [torch.from_numpy(np.array(array)) for array in value]
    return value


def _to_arrays(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: tensor.numpy() for key, tensor in value.items()}
    if isinstance(value, list):
        return [tensor.numpy() for tensor in value]
    return value


def server_state(strategy: Any, config: RunConfig) -> dict[str, Any]:
    """What the strategy carries into the next round, in checkpoint form."""
    state: dict[str, Any] = {}
    attributes = config.strategy_spec.server_state
    if attributes:
        aggregator = _aggregator(strategy)
        state["optimizer"] = {name: _to_tensors(getattr(aggregator, name)) for name in attributes}
    if isinstance(strategy, DpAccounting):
        state["privacy"] = strategy.accountant.to_state()
    return state


def restore_server_state(strategy: Any, config: RunConfig, state: dict[str, Any]) -> None:
    """Put a checkpoint's state back, or refuse in one line when a resumed run lacks state it needs."""
    attributes = config.strategy_spec.server_state
    if attributes:
        saved = state.get("optimizer")
        if not isinstance(saved, dict) or set(saved) != set(attributes):
            raise ConfigError(
                f"run-config resume-from: the checkpoint holds no {config.strategy} server-optimizer state "
                f"({', '.join(attributes)}), so resuming would restart the optimizer: start a new run instead"
            )
        aggregator = _aggregator(strategy)
        for name in attributes:
            setattr(aggregator, name, _to_arrays(saved[name]))
