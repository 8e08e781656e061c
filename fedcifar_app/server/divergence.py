"""Which run-config key most likely made a run diverge, from what the diverged round showed.

Flower-free and torch-free. The strategy hooks keep the last aggregation's inputs and output
(``hooks.Aggregation``); when a round goes non-finite, ``RoundEvidence`` sums them up in a few
numbers and ``blame`` weighs them against the strategy table's suspects: the clients' own step
(``learning-rate``), the strategy's server step (``StrategySpec.server_step``) and, with ``dp`` on,
the noise the server adds. Where the numbers do not single one out, it names the candidates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import DpMode, RunConfig
from ..strategy_table import FLOWER_DEFAULT

CLIENT_STEP_KEYS = ("learning-rate",)
DP_NOISE_KEYS = ("dp-clipping-norm", "dp-noise-multiplier")
# The aggregation moved the model this many times further than any client did: the server's own step
# did it. Between 1x (no plain mean can exceed its largest input) and this, both sides stay suspects.
SERVER_AMPLIFIED = 10.0
# The share of the server's step that the added noise must reach to be blamed alone, or to be cleared.
NOISE_DOMINATES, NOISE_NEGLIGIBLE = 0.9, 0.1


@dataclass(frozen=True)
class RoundEvidence:
    """The diverged round in numbers (L2 distances over all weights; inf where not finite)."""

    client_losses_finite: bool  # every reply's train-loss was finite
    client_step: float  # the largest distance of a reply's weights from the global model sent
    server_step: float | None  # the aggregate's distance from that model (None: nothing was aggregated)
    num_weights: int


@dataclass(frozen=True)
class Blame:
    """The keys most likely at fault, one or several, and the fact that points at them."""

    keys: tuple[str, ...]
    because: str
    sure: bool


def dp_noise_std(config: RunConfig, sampled: int) -> float:
    """The standard deviation per weight of the noise Flower adds to the mean update (0 with dp off)."""
    if config.dp is DpMode.OFF:
        return 0.0
    return config.dp_noise_multiplier * config.dp_clipping_norm / sampled


def blame(config: RunConfig, evidence: RoundEvidence | None, sampled: int) -> Blame:
    """The suspects of a divergence: the clients' step, the server's step or the DP noise."""
    server_keys = config.strategy_spec.server_step
    noise_keys = DP_NOISE_KEYS if config.dp is not DpMode.OFF else ()
    everyone = CLIENT_STEP_KEYS + server_keys + noise_keys
    if evidence is None or evidence.server_step is None:
        return Blame(everyone, "no aggregation to go by", sure=len(everyone) == 1)
    if not evidence.client_losses_finite or not math.isfinite(evidence.client_step):
        return Blame(CLIENT_STEP_KEYS, "the clients' own training went non-finite", sure=True)
    client, server = evidence.client_step, evidence.server_step
    if server <= client or not (server_keys or noise_keys):
        return Blame(CLIENT_STEP_KEYS, f"the clients' updates reached {client:.3g}", sure=True)
    noise = dp_noise_std(config, sampled) * math.sqrt(evidence.num_weights)
    moved = f"the aggregation moved the model {server:.3g}"
    moved += f", the noise alone {noise:.3g}," if noise_keys else ""
    moved += f" while no client's update exceeded {client:.3g}"
    suspects: tuple[str, ...]
    if noise_keys and (not server_keys or noise >= NOISE_DOMINATES * server):
        suspects, sure = noise_keys, True
    elif noise_keys and noise > NOISE_NEGLIGIBLE * server:
        suspects, sure = server_keys + noise_keys, False
    else:
        suspects, sure = server_keys, True
    if server < SERVER_AMPLIFIED * client:
        return Blame(suspects + CLIENT_STEP_KEYS, moved, sure=False)
    return Blame(suspects, moved, sure=sure)


def describe(config: RunConfig, key: str) -> str:
    """``key=value`` as the run config holds it; a key at FLOWER_DEFAULT says which default that is."""
    value = config.to_run_config()[key]
    default = config.strategy_spec.flower_defaults.get(key)
    if default is not None and value == FLOWER_DEFAULT:
        return f"{key}={value} (Flower's {default} for {config.strategy})"
    return f"{key}={value}"


def advice(config: RunConfig, suspect: Blame, sampled: int) -> str:
    """The hint after "training diverged": which key to lower, and why."""
    if suspect.sure and suspect.keys == DP_NOISE_KEYS:
        return (
            f"the DP noise (std {dp_noise_std(config, sampled):.3g} per weight = "
            f"{describe(config, 'dp-noise-multiplier')} x {describe(config, 'dp-clipping-norm')} / {sampled} nodes) "
            f"swamps the update ({suspect.because}); lower dp-clipping-norm, or dp-noise-multiplier at the cost of privacy"
        )
    named = [describe(config, key) for key in suspect.keys]
    if suspect.sure and len(named) == 1:
        return f"{named[0]} is likely too high ({suspect.because}); lower it"
    if suspect.sure:
        return f"{' or '.join(named)} is likely too high ({suspect.because}); lower one of them"
    return f"one of {', '.join(named)} is likely too high ({suspect.because}); lower one at a time to find it"
