"""conf/*.toml: each file passes the app's validation merged over pyproject's defaults, as `flwr run` merges it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from flwr.common.config import get_fused_config_from_dir, parse_config_args
from support.flwr_run import PROJECT

from fedcifar_app import pyproject
from fedcifar_app.config import RunConfig

CONF_FILES = sorted((PROJECT / "conf").glob("*.toml"))


def test_the_study_has_its_six_files():
    assert {path.stem for path in CONF_FILES} == {
        "iid-fedavg",
        "dirichlet-fedavg",
        "dirichlet-fedprox",
        "dirichlet-fedavgm",
        "dirichlet-fedadam",
        "dirichlet-fedavg-dp",
    }


@pytest.mark.parametrize("path", CONF_FILES, ids=lambda path: path.name)
def test_conf_file_is_a_valid_run_config_that_leaves_where_and_which_data_to_the_user(path: Path):
    overrides = parse_config_args([str(path)])  # what `flwr run . --run-config conf/x.toml` reads
    config = RunConfig.from_run_config(get_fused_config_from_dir(PROJECT, overrides))
    assert config.num_server_rounds == 20 and config.min_train_nodes == 10  # the study: 10 nodes, 20 rounds
    assert not {"dataset", "seed", "output-dir", "resume-from"} & set(overrides)
    # So the pyproject default applies: the hub id, which needs internet (docs/experiments.md says how to point at a copy).
    assert config.dataset == RunConfig().dataset


def load_study_module():
    spec = importlib.util.spec_from_file_location("study", PROJECT / "benchmarks" / "study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", CONF_FILES, ids=lambda path: path.name)
def test_the_study_passes_each_file_as_one_valid_run_config_string(path: Path, tmp_path):
    study = load_study_module()
    local = tmp_path / "cifar10"
    local.mkdir()
    values = study.run_config_for(path, str(local), 3, tmp_path / "runs", rounds=None, nodes=10)
    text = pyproject.format_overrides(values)  # what `flwr run . --run-config` receives
    parsed = pyproject.parse_overrides(text)
    assert parsed["dataset"] == str(local.resolve()) and parsed["seed"] == 3  # absolute: flwr's cwd is the app
    assert {key: parsed[key] for key in parse_config_args([str(path)])} == parse_config_args([str(path)])
    RunConfig.from_run_config(get_fused_config_from_dir(PROJECT, parsed))
    smoke = study.run_config_for(path, "synthetic", 1, tmp_path / "runs", rounds=2, nodes=3)
    assert RunConfig.from_run_config(get_fused_config_from_dir(PROJECT, smoke)).min_available_nodes == 3
    command = study.flwr_command(smoke, nodes=3)
    federation = pyproject.parse_overrides(command[command.index("--federation-config") + 1], "--federation-config")
    assert federation["options.num-supernodes"] == 3
