"""conf/*.toml: each file passes the app's validation merged over pyproject's defaults, as `flwr run` merges it."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import PROJECT
from flwr.common.config import get_fused_config_from_dir, parse_config_args

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
    # So the pyproject default applies: the hub id, which needs internet (README says how to point at a copy).
    assert config.dataset == RunConfig().dataset
