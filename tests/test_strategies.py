"""Strategies beyond FedAvg, FedProx's term, differential privacy and its epsilon, server-state resume.

End-to-end runs use tests/support/inprocess.py: Flower's own simulation engine with the real
ServerApp, ClientApp and strategies, whose ClientApp calls run in a thread instead of Ray (a
2-round, 3-node synthetic run takes a few seconds). One real `flwr run .` (fedprox + client DP)
proves the production path.
"""

from __future__ import annotations

import inspect
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from support.datasets import small_synthetic
from support.flwr_run import PROJECT, SMALL_NODES, run_flwr
from support.inprocess import run_inprocess
from support.recorder import MemoryRecorder
from support.tensorboard import read_scalars

from fedcifar_app import training
from fedcifar_app.client.app import client_dp_clipping
from fedcifar_app.compat import MessageType
from fedcifar_app.config import DpMode, RunConfig
from fedcifar_app.errors import ConfigError
from fedcifar_app.model import new_model
from fedcifar_app.runs.folder import CHECKPOINT, FINAL_MODEL
from fedcifar_app.runs.metrics import RoundRow
from fedcifar_app.server import strategy_builder
from fedcifar_app.server.hooks import AppHooks, StrategyHooks
from fedcifar_app.server.privacy import PrivacyAccountant
from fedcifar_app.server.strategy_builder import build_strategy, flower_class, nodes_sampled, server_state
from fedcifar_app.strategy_table import STRATEGY_SPECS, StrategySpec, strategy_keys

CPU = torch.device("cpu")
PYPROJECT = (PROJECT / "pyproject.toml").read_text(encoding="utf-8")
EXPERIMENTS_DOC = (PROJECT / "docs" / "experiments.md").read_text(encoding="utf-8")
CONFIGURATION_DOC = (PROJECT / "docs" / "configuration.md").read_text(encoding="utf-8")
SMALL = {"dataset": "synthetic", "min-train-nodes": 3, "min-evaluate-nodes": 2, "min-available-nodes": 3}


def run(tmp_path: Path, **overrides) -> Path:
    """An in-process run (2 rounds unless told) into its own output folder; returns the run folder."""
    config = {**SMALL, "num-server-rounds": 2, "output-dir": str(tmp_path / "out"), **overrides}
    return run_inprocess({key.replace("_", "-"): value for key, value in config.items()})


def status(folder: Path) -> dict:
    return json.loads((folder / "status.json").read_text())


def rows(folder: Path) -> list[dict]:
    return json.loads((folder / "metrics.json").read_text())


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "strategy, key, value",
    [
        ("fedavg", "proximal-mu", 0.1),
        ("fedprox", "server-learning-rate", 0.5),
        ("fedadam", "server-momentum", 0.9),
        ("fedavgm", "trim-beta", 0.1),
        ("fedmedian", "num-malicious-nodes", 1),
    ],
)
def test_a_key_the_strategy_ignores_is_refused_in_one_line(strategy, key, value):
    with pytest.raises(ConfigError) as caught:
        RunConfig.from_run_config({"strategy": strategy, key: value})
    message = str(caught.value)
    assert f"{key}={value!r}" in message and f"strategy={strategy!r}" in message and "\n" not in message


def test_dp_keys_need_dp_on():
    with pytest.raises(ConfigError, match=r"dp-noise-multiplier=0.5 has no effect with dp='off'"):
        RunConfig.from_run_config({"dp-noise-multiplier": 0.5})
    assert RunConfig.from_run_config({"dp": "client", "dp-noise-multiplier": 0.3}).dp_noise_multiplier == 0.3


@pytest.mark.parametrize(
    "key, value, choices",
    [
        ("strategy", "fedsgd", ", ".join(repr(spec.name) for spec in STRATEGY_SPECS)),
        ("dp", "local", "'off', 'central', 'client'"),
    ],
)
def test_an_unknown_name_lists_the_choices(key, value, choices):
    with pytest.raises(ConfigError, match=re.escape(f"{key}={value!r} is not allowed: use one of {choices}")):
        RunConfig.from_run_config({key: value})


@pytest.mark.parametrize("key, value", [("dp-noise-multiplier", 0.0), ("dp-clipping-norm", -1.0), ("dp-delta", 1.0)])
def test_dp_values_out_of_range_are_refused(key, value):
    with pytest.raises(ConfigError, match=re.escape(f"{key}={value!r} is not allowed")):
        RunConfig.from_run_config({"dp": "central", key: value})


# A value other than its default for every strategy key, so a test sees each reach Flower. A new key needs
# one here (test_every_strategy_key_has_an_example_value says so).
EXAMPLE_VALUES = {
    "proximal-mu": 0.1,
    "server-learning-rate": 0.05,
    "server-momentum": 0.5,
    "trim-beta": 0.1,
    "num-malicious-nodes": 0,  # Krum with 3 nodes per round: 2 * 0 + 3
}


def example_keys(spec: StrategySpec) -> dict[str, object]:
    return {key: EXAMPLE_VALUES[key] for key in spec.arguments}


def strategy_config(spec: StrategySpec) -> RunConfig:
    return RunConfig.from_run_config({"strategy": spec.name, **example_keys(spec)})


def hooks() -> StrategyHooks:
    return StrategyHooks(
        recorder=MemoryRecorder(),
        needed_nodes=10,
        min_train_nodes=10,
        node_wait_timeout=1.0,
        round_timeout=1.0,
        simulation=True,
    )


def build(num_nodes: int = 10, **overrides):
    config = RunConfig.from_run_config({key.replace("_", "-"): value for key, value in overrides.items()})
    return build_strategy(config, hooks(), num_nodes)


def test_every_strategy_key_has_an_example_value():
    assert set(strategy_keys()) == set(EXAMPLE_VALUES)


@pytest.mark.parametrize("spec", STRATEGY_SPECS, ids=lambda spec: spec.name)
def test_each_table_entry_builds_its_flower_class_with_the_keys_it_reads(spec):
    strategy = build(strategy=spec.name, **example_keys(spec))
    assert isinstance(strategy, flower_class(spec)) and isinstance(strategy, AppHooks)
    for key, argument in spec.arguments.items():
        assert getattr(strategy, argument) == EXAMPLE_VALUES[key], (key, argument)


@pytest.mark.parametrize("spec", [spec for spec in STRATEGY_SPECS if spec.flower_defaults], ids=lambda spec: spec.name)
def test_a_key_left_at_zero_keeps_flowers_own_default_which_the_table_names(spec):
    strategy = build(strategy=spec.name)
    parameters = inspect.signature(flower_class(spec)).parameters
    for key, default in spec.flower_defaults.items():
        argument = spec.arguments[key]
        assert getattr(strategy, argument) == default == parameters[argument].default, (key, argument)


@pytest.mark.parametrize("spec", [spec for spec in STRATEGY_SPECS if spec.server_state], ids=lambda spec: spec.name)
def test_the_server_state_the_table_names_is_where_flower_keeps_it(spec):
    strategy = build_strategy(strategy_config(spec), hooks(), num_nodes=10)
    assert all(getattr(strategy, name) is None for name in spec.server_state)  # Flower's "before round 1"
    assert server_state(strategy, strategy_config(spec)) == {"optimizer": dict.fromkeys(spec.server_state)}


def test_dp_wraps_flowers_strategy_with_noise_for_the_nodes_sampled():
    dp = build(strategy="fedavgm", dp="central", fraction_train=0.5, min_train_nodes=2, dp_noise_multiplier=0.7)
    assert type(dp.strategy).__name__ == "FedAvgM" and dp.noise_multiplier == 0.7 and dp.num_sampled_clients == 5
    assert dp.sampling_rate == 0.5


def test_nodes_sampled_follows_flowers_minimum():
    assert nodes_sampled(RunConfig(fraction_train=0.05), 10) == 10
    assert nodes_sampled(RunConfig(fraction_train=0.5, min_train_nodes=2), 10) == 5


def docs_row(spec: StrategySpec) -> str:
    """The row docs/experiments.md must hold for ``spec``."""
    keys = [
        f"`{key}`" + (f" (0 = Flower's {spec.flower_defaults[key]})" if key in spec.flower_defaults else "")
        for key in spec.arguments
    ]
    summary = spec.summary.replace("|", "\\|")
    return f"| `{spec.name}` | `{spec.flower_class}` | {summary} | {', '.join(keys) or 'none'} |"


def test_the_docs_list_the_table_row_by_row():
    rows = [line for line in EXPERIMENTS_DOC.splitlines() if re.match(r"\| `\w+` \| `\w+` \|", line)]
    assert rows == [docs_row(spec) for spec in STRATEGY_SPECS]
    names = ", ".join(f"`{spec.name}`" for spec in STRATEGY_SPECS)
    assert f'| `strategy` | `"fedavg"` | {names} (see' in CONFIGURATION_DOC


def pyproject_comment(key: str) -> str:
    line = next(line for line in PYPROJECT.splitlines() if line.startswith(f"{key} = "))
    return line.split("#", 1)[1].strip()


def test_pyproject_comments_name_the_strategies_and_who_reads_each_key():
    assert pyproject_comment("strategy") == ", ".join(spec.name for spec in STRATEGY_SPECS)
    for key, readers in strategy_keys().items():
        assert re.match(rf"{' / '.join(readers)}\b(?! /)", pyproject_comment(key)), (key, pyproject_comment(key))
    defaults = ", ".join(
        f"{spec.name} {spec.flower_defaults['server-learning-rate']}"
        for spec in STRATEGY_SPECS
        if "server-learning-rate" in spec.flower_defaults
    )
    assert f"({defaults})" in PYPROJECT and f"({defaults})" in CONFIGURATION_DOC


def test_krum_needs_enough_nodes_per_round():
    with pytest.raises(ConfigError, match=r"num-malicious-nodes=4: Krum needs at least .* = 11 nodes .* 10 train"):
        build(strategy="krum", num_malicious_nodes=4)


# --------------------------------------------------------------------------- FedProx term


def train_once(mu: float | None) -> dict[str, torch.Tensor]:
    model = new_model(3)
    extra = {} if mu is None else {"proximal_mu": mu}
    training.train(model, small_synthetic(96), epochs=1, batch_size=32, learning_rate=0.01, device=CPU, seed=5, **extra)
    return training.get_weights(model)


def test_proximal_mu_zero_is_plain_training_bit_for_bit_and_mu_pulls_towards_the_global_model():
    start = new_model(3).state_dict()
    plain, zero, prox = train_once(None), train_once(0.0), train_once(5.0)
    assert all(torch.equal(plain[k], zero[k]) for k in plain)
    assert not all(torch.equal(plain[k], prox[k]) for k in plain)

    def distance(weights):
        return sum(float((weights[k] - start[k]).pow(2).sum()) for k in start)

    assert distance(prox) < distance(plain)


# --------------------------------------------------------------------------- client DP mod


def train_message(clipping_norm: float | None) -> Message:
    config = ConfigRecord({"server-round": 1} | ({"clipping_norm": clipping_norm} if clipping_norm else {}))
    arrays = ArrayRecord({"w": torch.zeros(4)})
    return Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=1, message_type=MessageType.TRAIN)


def reply_far_away(msg: Message, context: Context) -> Message:
    content = RecordDict({"arrays": ArrayRecord({"w": torch.full((4,), 10.0)}), "metrics": MetricRecord({"x": 1})})
    return Message(content, reply_to=msg)


def context_with(dp: str) -> Context:
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={"dp": dp})


def test_the_clipping_mod_clips_only_in_client_dp_runs():
    clipped = client_dp_clipping(train_message(1.0), context_with("client"), reply_far_away)
    assert np.linalg.norm(clipped.content["arrays"]["w"].numpy()) == pytest.approx(1.0, rel=1e-5)
    for dp in ("off", "central"):  # no clipping norm is sent there: Flower's mod would reply with an error
        untouched = client_dp_clipping(train_message(None), context_with(dp), reply_far_away)
        assert not untouched.has_error() and float(untouched.content["arrays"]["w"].numpy()[0]) == 10.0


# --------------------------------------------------------------------------- accountant


def test_accountant_grows_with_rounds_and_survives_its_state():
    accountant = PrivacyAccountant(delta=1e-5)
    assert accountant.epsilon() == 0.0
    epsilons = []
    for _ in range(3):
        accountant.step(1.0, 0.5)
        epsilons.append(accountant.epsilon())
    assert 0 < epsilons[0] < epsilons[1] < epsilons[2]
    again = PrivacyAccountant.from_state(accountant.to_state())
    again.step(1.0, 0.5)
    accountant.step(1.0, 0.5)
    assert again.epsilon() == accountant.epsilon() and again.rounds == 4
    assert PrivacyAccountant(1e-5, [(1.0, 0.5, 4)]).epsilon() == accountant.epsilon()


def test_older_rows_read_epsilon_as_none():
    assert RoundRow.from_json({"round": 1, "central-accuracy": 0.5}).epsilon is None


# --------------------------------------------------------------------------- end to end, in process


@pytest.mark.parametrize("spec", STRATEGY_SPECS, ids=lambda spec: spec.name)
def test_each_strategy_runs_two_rounds(tmp_path, spec):
    folder = run(tmp_path, strategy=spec.name, **example_keys(spec))
    assert status(folder)["status"] == "completed", status(folder)
    recorded = rows(folder)
    assert [row["round"] for row in recorded] == [0, 1, 2]
    assert all(math.isfinite(row["central-loss"]) and row["epsilon"] is None for row in recorded)
    assert json.loads((folder / "config.json").read_text())["strategy"] == spec.name
    assert len(list(folder.glob("events.out.tfevents.*"))) == 1  # TensorBoard scalars beside metrics.json


@pytest.mark.parametrize("dp", ["central", "client"])
def test_dp_runs_record_growing_epsilon_and_resume_continues_it(tmp_path, dp):
    dp_keys = {"dp": dp, "dp_noise_multiplier": 2.0, "dp_clipping_norm": 0.1}
    folder = run(tmp_path, **dp_keys)
    assert status(folder)["status"] == "completed", status(folder)
    epsilons = [row["epsilon"] for row in rows(folder)]
    assert epsilons[0] is None and 0 < epsilons[1] < epsilons[2]
    assert epsilons[2] == pytest.approx(PrivacyAccountant(1e-5, [(2.0, 1.0, 2)]).epsilon())
    assert [step for step, _ in read_scalars(folder)["epsilon"]] == [1, 2]  # TensorBoard has it too
    resumed = run(tmp_path, num_server_rounds=3, resume_from=str(folder), **dp_keys)
    assert status(resumed)["status"] == "completed", status(resumed)
    assert [row["epsilon"] for row in rows(resumed)][:3] == epsilons
    assert rows(resumed)[3]["epsilon"] == pytest.approx(PrivacyAccountant(1e-5, [(2.0, 1.0, 3)]).epsilon())


def max_difference(folder_a: Path, folder_b: Path) -> float:
    a, b = (torch.load(folder / FINAL_MODEL, weights_only=True) for folder in (folder_a, folder_b))
    return max(float((a[key] - b[key]).abs().max()) for key in a)


@pytest.mark.slow
def test_fedadam_resume_restores_the_server_moments(tmp_path, monkeypatch):
    """3 rounds in one go == 2 rounds + resume for 1, up to float64 rounding: Flower's FedAdam hands back
    float64 arrays, the checkpoint keeps the float32 model (1e-9 here). Restarted moments differ by ~1e-3."""
    fedadam = {"strategy": "fedadam", "server_learning_rate": 0.01}
    whole = run(tmp_path / "whole", num_server_rounds=3, **fedadam)
    first = run(tmp_path / "parts", **fedadam)
    state = torch.load(first / CHECKPOINT, weights_only=True)["server-state"]["optimizer"]
    assert set(state) == {"m_t", "v_t"} and all(tensor.abs().sum() > 0 for tensor in state["v_t"].values())
    resumed = run(tmp_path / "parts", num_server_rounds=3, resume_from=str(first), **fedadam)
    assert status(resumed)["status"] == "completed", status(resumed)
    assert max_difference(whole, resumed) < 1e-6

    monkeypatch.setattr(strategy_builder, "restore_server_state", lambda *args: None)  # the control: moments restart
    restarted = run(tmp_path / "parts", num_server_rounds=3, resume_from=str(first), **fedadam)
    assert max_difference(whole, restarted) > 1e-4


def test_a_checkpoint_without_the_state_a_strategy_needs_is_refused_in_one_line():
    for overrides, expected in (
        ({"strategy": "fedadam"}, "holds no fedadam server-optimizer state (m_t, v_t)"),
        ({"strategy": "fedavgm", "server-momentum": 0.9}, "holds no fedavgm server-optimizer state"),
        ({"dp": "central"}, "holds no privacy accountant, so epsilon would restart"),
    ):
        with pytest.raises(ConfigError, match=re.escape(expected)) as caught:
            build_strategy(RunConfig.from_run_config(overrides), hooks(), 10, resumed_state={})
        assert "\n" not in str(caught.value)


def test_bad_strategy_parameters_fail_the_run_in_one_line(tmp_path):
    folder = run(tmp_path, strategy="krum", num_malicious_nodes=1)
    assert status(folder)["status"] == "failed"
    reason = status(folder)["reason"]
    assert "num-malicious-nodes=1" in reason and "Krum needs at least" in reason and "\n" not in reason
    assert not (folder / "metrics.json").exists()  # refused before round 0


def test_server_state_of_a_strategy_without_a_server_optimizer_is_empty_or_the_privacy_accountant():
    assert server_state(build(), RunConfig()) == {}
    assert set(server_state(build(dp="central"), RunConfig(dp=DpMode.CENTRAL))) == {"privacy"}


# --------------------------------------------------------------------------- the real path


@pytest.mark.slow
def test_real_flwr_run_with_fedprox_and_client_dp(tmp_path, flwr_env):
    result = run_flwr(
        tmp_path / "out",
        f"num-server-rounds=2 dataset='synthetic' {SMALL_NODES} strategy='fedprox' proximal-mu=0.1 "
        "dp='client' dp-noise-multiplier=2.0 dp-clipping-norm=0.1",
        env=flwr_env,
    )
    assert result.run_folder is not None, result.output[-3000:]
    assert result.status["status"] == "completed", result.output[-3000:]
    epsilons = [row["epsilon"] for row in result.metrics]
    assert epsilons[0] is None and 0 < epsilons[1] < epsilons[2]
    assert "Strategy: fedprox (dp client)" in result.output and "Traceback" not in result.output
