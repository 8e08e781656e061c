"""The run config: defaults reproduce the tutorial, bad values are refused with the fix."""

from __future__ import annotations

import pytest
from support.flwr_run import PROJECT

from fedcifar_app.config import NodeData, Partitioner, RunConfig
from fedcifar_app.errors import ConfigError
from fedcifar_app.pyproject import app_run_config


def pyproject_run_config() -> dict:
    return app_run_config(PROJECT)


def test_pyproject_defaults_are_the_tutorials():
    config = RunConfig.from_run_config(pyproject_run_config())
    assert config == RunConfig()  # one source of truth: the dataclass mirrors pyproject.toml
    assert (config.num_server_rounds, config.fraction_train, config.fraction_evaluate) == (5, 1.0, 0.5)
    assert (config.min_train_nodes, config.min_evaluate_nodes, config.min_available_nodes) == (10, 5, 10)
    assert (config.local_epochs, config.batch_size, config.learning_rate) == (1, 32, 0.001)
    assert config.partitioner is Partitioner.IID and config.dataset == "uoft-cs/cifar10"


def test_round_trip_through_config_json():
    config = RunConfig.from_run_config({**pyproject_run_config(), "partitioner": "dirichlet", "seed": 7})
    assert RunConfig.from_run_config(config.to_run_config()) == config


def test_integers_given_as_whole_floats_are_accepted_and_ints_widen_to_floats():
    config = RunConfig.from_run_config({"num-server-rounds": 3.0, "learning-rate": 1, "fraction-train": 1})
    assert config.num_server_rounds == 3 and config.learning_rate == 1.0


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("partitioner", "pathological", "one of 'iid', 'dirichlet'"),
        ("dirichlet-alpha", 0.0, "> 0"),
        ("fraction-train", 1.5, "(0, 1]"),
        ("fraction-evaluate", 0.0, "(0, 1]"),
        ("num-server-rounds", 0, ">= 1"),
        ("batch-size", 0, ">= 1"),
        ("learning-rate", -0.1, "> 0"),
        ("val-fraction", 1.0, "(0, 1)"),
        ("local-epochs", 2.5, "an integer"),
        ("verbose", "yes", "true or false"),
        ("device", "tpu", "'auto', 'cpu', 'cuda'"),
        ("dataset", 3, "quoted string"),
    ],
)
def test_bad_values_name_key_value_and_what_is_allowed(key, value, expected):
    with pytest.raises(ConfigError) as caught:
        RunConfig.from_run_config({key: value})
    message = str(caught.value)
    assert key in message and repr(value) in message and expected in message
    assert "\n" not in message


def test_unknown_key_lists_the_allowed_ones():
    with pytest.raises(ConfigError, match="unknown run-config key.*num-rounds.*allowed keys are"):
        RunConfig.from_run_config({"num-rounds": 3})


def test_min_available_must_cover_the_sample_sizes():
    with pytest.raises(ConfigError, match="min-available-nodes=3 .*min-train-nodes \\(5\\)"):
        RunConfig.from_run_config({"min-available-nodes": 3, "min-train-nodes": 5, "min-evaluate-nodes": 2})


def test_node_config_partition_or_data_path():
    assert NodeData.from_node_config({"partition-id": 2, "num-partitions": 10}) == NodeData(2, 10)
    assert NodeData.from_node_config({"data-path": "/data/org1"}).data_path == "/data/org1"
    with pytest.raises(ConfigError) as caught:
        NodeData.from_node_config({})
    assert "partition-id" in str(caught.value) and "data-path" in str(caught.value)
    with pytest.raises(ConfigError, match="partition-id=10 must be an integer in 0..9"):
        NodeData.from_node_config({"partition-id": 10, "num-partitions": 10})
