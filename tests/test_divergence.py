"""A diverged run names the key that most likely did it: the clients' learning-rate, the strategy's server
step or the DP noise, from what the round showed (server/divergence.py); the candidates when unsure."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from support.inprocess import run_inprocess

from fedcifar_app.config import RunConfig
from fedcifar_app.server.divergence import RoundEvidence, advice, blame, describe

SMALL = {"dataset": "synthetic", "min-train-nodes": 3, "min-evaluate-nodes": 2, "min-available-nodes": 3}
WEIGHTS = 62_006  # the tutorial CNN


def config(**values) -> RunConfig:
    return RunConfig.from_run_config({key.replace("_", "-"): value for key, value in values.items()})


def evidence(client_step: float, server_step: float | None, losses_finite: bool = True) -> RoundEvidence:
    return RoundEvidence(losses_finite, client_step, server_step, WEIGHTS)


def test_clients_whose_training_went_non_finite_blame_learning_rate_whatever_the_strategy():
    for strategy in ("fedavg", "fedadam", "fedavgm"):
        suspect = blame(config(strategy=strategy), evidence(math.inf, math.inf, losses_finite=False), sampled=3)
        assert suspect.keys == ("learning-rate",) and suspect.sure


def test_an_aggregate_no_further_than_a_client_update_blames_learning_rate():
    assert blame(config(strategy="fedadam"), evidence(5.0, 4.0), sampled=3).keys == ("learning-rate",)


def test_a_server_step_far_beyond_the_clients_blames_the_strategys_server_keys():
    assert blame(config(strategy="fedadam"), evidence(2.0, 1e31), sampled=3).keys == ("server-learning-rate",)
    fedavgm = blame(config(strategy="fedavgm"), evidence(2.0, 1e31), sampled=3)
    assert fedavgm.keys == ("server-learning-rate", "server-momentum") and fedavgm.sure


def test_noise_that_makes_up_the_server_step_blames_the_dp_keys():
    noisy = config(dp="central", dp_clipping_norm=1e30)
    noise = 1e30 / 3 * math.sqrt(WEIGHTS)
    assert blame(noisy, evidence(2.0, noise), sampled=3).keys == ("dp-clipping-norm", "dp-noise-multiplier")


def test_with_a_server_optimizer_and_dp_the_larger_share_of_the_server_step_is_blamed():
    quiet = config(strategy="fedadam", dp="central", dp_noise_multiplier=0.1, dp_clipping_norm=0.1)
    assert blame(quiet, evidence(2.0, 1e31), sampled=3).keys == ("server-learning-rate",)
    noise = 0.1 * 0.1 / 3 * math.sqrt(WEIGHTS)
    mixed = blame(quiet, evidence(0.01, noise * 2), sampled=3)
    assert mixed.keys == ("server-learning-rate", "dp-clipping-norm", "dp-noise-multiplier") and not mixed.sure


def test_a_server_step_only_a_little_beyond_the_clients_names_both_sides():
    suspect = blame(config(strategy="fedadam"), evidence(2.0, 6.0), sampled=3)
    assert suspect.keys == ("server-learning-rate", "learning-rate") and not suspect.sure
    hint = advice(config(strategy="fedadam"), suspect, sampled=3)
    assert hint.startswith("one of server-learning-rate=0.0 (Flower's 0.1 for fedadam), learning-rate=0.001 is")


def test_without_an_aggregation_every_candidate_is_named():
    suspect = blame(config(strategy="fedavgm", dp="client"), None, sampled=3)
    assert suspect.keys == (
        "learning-rate",
        "server-learning-rate",
        "server-momentum",
        "dp-clipping-norm",
        "dp-noise-multiplier",
    )
    assert not suspect.sure


def test_a_key_at_zero_is_named_with_the_flower_default_it_stands_for():
    assert describe(config(strategy="fedyogi"), "server-learning-rate") == (
        "server-learning-rate=0.0 (Flower's 0.01 for fedyogi)"
    )
    assert describe(config(strategy="fedyogi", server_learning_rate=0.5), "server-learning-rate") == (
        "server-learning-rate=0.5"
    )


# --------------------------------------------------------------------------- end to end, in process


def failed_reason(tmp_path: Path, **overrides) -> str:
    """An in-process run (2 rounds) that must fail; returns its status reason."""
    values = {**SMALL, "num-server-rounds": 2, "output-dir": str(tmp_path / "out"), **overrides}
    folder = run_inprocess({key.replace("_", "-"): value for key, value in values.items()})
    status = json.loads((folder / "status.json").read_text())
    assert status["status"] == "failed", status
    assert "round 1" in status["reason"] and "training diverged" in status["reason"], status
    return status["reason"]


def test_fedadam_with_a_huge_server_learning_rate_names_it_not_the_clients_learning_rate(tmp_path):
    reason = failed_reason(tmp_path, strategy="fedadam", server_learning_rate=1e30)
    assert "server-learning-rate=1e+30 is likely too high" in reason
    assert "learning-rate=0.001" not in reason


def test_fedavg_with_a_huge_learning_rate_names_learning_rate(tmp_path):
    reason = failed_reason(tmp_path, learning_rate=1e30)
    assert "learning-rate=1e+30 is likely too high (the clients' own training went non-finite)" in reason
    assert "server-" not in reason and "dp-" not in reason


@pytest.mark.parametrize("dp", ["central", "client"])
def test_dp_noise_that_swamps_the_update_names_the_clipping_norm(tmp_path, dp):
    reason = failed_reason(tmp_path, dp=dp, dp_clipping_norm=1e30)
    assert "the DP noise (std 3.33e+29 per weight = dp-noise-multiplier=1.0 x dp-clipping-norm=1e+30 / 3" in reason
    assert "learning-rate" not in reason
