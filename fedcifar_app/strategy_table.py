"""The aggregation strategies, one entry each: everything this app knows about a strategy, in one place.

``config.py`` validates ``strategy`` and the keys each strategy reads from this table,
``server/strategy_builder.py`` builds Flower's class from it (constructor arguments, the server
optimizer state a checkpoint carries, extra checks), and a diverged run's hint names its suspects
from it. Flower-free and torch-free: the class is named, ``flwr.serverapp.strategy`` holds it.
Adding a strategy is one ``StrategySpec`` here, its row in docs/experiments.md and its name in
pyproject.toml's ``strategy`` comment (tests/test_strategies.py checks that the three agree and runs
every entry); a new hyperparameter key also needs its ``RunConfig`` field and its line in
pyproject.toml, since Flower refuses run-config keys that pyproject.toml does not declare. See
docs/experiments.md, "How to add a strategy".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

# A key listed in ``flower_defaults`` at this value is not passed, so Flower's own default applies
# (TOML has no null).
FLOWER_DEFAULT = 0.0


@dataclass(frozen=True)
class NodesPerRound:
    """A least number of nodes a strategy needs among those sampled each round, computed from its keys."""

    rule: str  # as the error names it, e.g. "2 * num-malicious-nodes + 3"
    count: Callable[[Mapping[str, Any]], int]  # the run config (kebab-case keys) -> that number


@dataclass(frozen=True)
class StrategySpec:
    """One strategy: what ``strategy='<name>'`` builds and which run-config keys it reads."""

    name: str  # the run-config value
    flower_class: str  # the class in ``flwr.serverapp.strategy``
    summary: str  # one line for the docs
    # run-config key -> the Flower constructor argument it sets (Flower keeps it under the same attribute name)
    arguments: Mapping[str, str] = field(default_factory=dict)
    # keys whose FLOWER_DEFAULT means "Flower's own default", with that default (for the docs and hints)
    flower_defaults: Mapping[str, float] = field(default_factory=dict)
    # attributes where Flower keeps a server optimizer's state between rounds; checkpoints carry them
    server_state: tuple[str, ...] = ()
    # keys that size the server's own step: a round that diverges with the clients' steps sane blames them
    server_step: tuple[str, ...] = ()
    nodes_per_round: NodesPerRound | None = None


def server_optimizer(name: str, flower_class: str, optimizer: str, flower_default_rate: float) -> StrategySpec:
    """One of Flower's FedOpt strategies: an optimizer on the server over the mean update, whose learning
    rate is ``eta`` and whose moments (``m_t``, ``v_t``) carry over from round to round."""
    return StrategySpec(
        name,
        flower_class,
        f"{optimizer} on the server over the mean update",
        arguments={"server-learning-rate": "eta"},
        flower_defaults={"server-learning-rate": flower_default_rate},
        server_state=("m_t", "v_t"),
        server_step=("server-learning-rate",),
    )


STRATEGY_SPECS = (
    StrategySpec("fedavg", "FedAvg", "the mean of the nodes' models, weighted by their examples"),
    StrategySpec(
        "fedprox",
        "FedProx",
        "FedAvg; each client adds mu/2 * ||w - w_global||^2 to its loss",
        arguments={"proximal-mu": "proximal_mu"},
    ),
    StrategySpec(
        "fedavgm",
        "FedAvgM",
        "FedAvg with server momentum",
        arguments={"server-learning-rate": "server_learning_rate", "server-momentum": "server_momentum"},
        flower_defaults={"server-learning-rate": 1.0},
        server_state=("momentum_vector",),
        server_step=("server-learning-rate", "server-momentum"),
    ),
    server_optimizer("fedadam", "FedAdam", "Adam", flower_default_rate=0.1),
    server_optimizer("fedyogi", "FedYogi", "Yogi", flower_default_rate=0.01),
    server_optimizer("fedadagrad", "FedAdagrad", "Adagrad", flower_default_rate=0.1),
    StrategySpec("fedmedian", "FedMedian", "the coordinate-wise median of the nodes' models"),
    StrategySpec(
        "fedtrimmedavg",
        "FedTrimmedAvg",
        "the coordinate-wise mean after cutting a trim-beta share from each end",
        arguments={"trim-beta": "beta"},
    ),
    StrategySpec(
        "krum",
        "Krum",
        "the one node model closest to its neighbours (robust to num-malicious-nodes attackers)",
        arguments={"num-malicious-nodes": "num_malicious_nodes"},
        nodes_per_round=NodesPerRound(
            "2 * num-malicious-nodes + 3", lambda values: 2 * int(values["num-malicious-nodes"]) + 3
        ),
    ),
)
STRATEGIES: dict[str, StrategySpec] = {spec.name: spec for spec in STRATEGY_SPECS}


def strategy_keys() -> dict[str, tuple[str, ...]]:
    """Every strategy hyperparameter key -> the strategies that read it, in table order."""
    readers: dict[str, tuple[str, ...]] = {}
    for spec in STRATEGY_SPECS:
        for key in spec.arguments:
            readers[key] = (*readers.get(key, ()), spec.name)
    return readers
