"""A misspelt run-config key. Under `flwr run` Flower refuses a key that is not in pyproject.toml before
the app is loaded (simulation: flower-simulation; deployment: flwr-serverapp), so the app cannot catch
it there; docs/troubleshooting.md explains Flower's message and lists the valid keys, and
``python -m fedcifar_app.config`` checks a --run-config before it is submitted. The app's own parsers
(fedcifar-centralized, the checker) name the key with the nearest valid one and, like Flower, read a
TOML file given as --run-config."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tomli
from support.flwr_run import PROJECT, run_flwr

from fedcifar_app import config as config_module
from fedcifar_app.config import RunConfig
from fedcifar_app.errors import ConfigError, UsageError
from fedcifar_app.pyproject import app_run_config, parse_overrides

TROUBLESHOOTING = (PROJECT / "docs" / "troubleshooting.md").read_text(encoding="utf-8")
FLOWER_MESSAGE = "ValueError: Key 'learning_rate' is not present in the main dictionary"


@pytest.mark.parametrize(
    ("key", "nearest"),
    [("learning_rate", "learning-rate"), ("num-rounds", "num-server-rounds"), ("epochs", "local-epochs"), ("lr", None)],
)
def test_an_unknown_key_names_the_nearest_valid_one(key, nearest):
    with pytest.raises(ConfigError) as caught:
        RunConfig.from_run_config({key: 1})
    hint = f" (did you mean {nearest}?)" if nearest else ""
    assert str(caught.value).startswith(f"unknown run-config key(s) {key}{hint}: allowed keys are batch-size, ")


def test_a_toml_file_is_read_as_flower_reads_it(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text("learning-rate = 0.01\ndataset = 'synthetic'\n")
    assert parse_overrides(str(good)) == {"learning-rate": 0.01, "dataset": "synthetic"}
    with pytest.raises(UsageError, match=r"missing.toml: cannot be read \(No such file or directory\)"):
        parse_overrides(str(tmp_path / "missing.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("learning-rate = \n")
    with pytest.raises(UsageError, match="bad.toml: not valid TOML"):
        parse_overrides(str(bad))


def test_the_checker_finds_a_misspelt_key_before_flower_does(tmp_path, capsys):
    assert config_module.main(["--app", str(PROJECT), "--run-config", "learning_rate=0.01"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "python -m fedcifar_app.config: error: unknown run-config key(s) learning_rate (did you mean learning-rate?): "
        "allowed keys are "
    ), err
    typo = tmp_path / "typo.toml"
    typo.write_text("learning_rate = 0.01\n")
    assert config_module.main(["--app", str(PROJECT), "--run-config", str(typo)]) == 2
    assert "learning_rate (did you mean learning-rate?)" in capsys.readouterr().err
    assert config_module.main(["--app", str(PROJECT), "--run-config", "learning-rate=0.01 strategy='fedprox'"]) == 0
    assert capsys.readouterr().out == "run config OK (overrides: learning-rate=0.01 strategy='fedprox')\n"


def test_troubleshooting_lists_every_valid_key_and_quotes_flowers_message():
    section = TROUBLESHOOTING.split("### A misspelt run-config key", 1)[1].split("\n## ", 1)[0]
    listed = tomli.loads("\n".join(re.findall(r"^ {4}([a-z-]+ = .*)$", section, flags=re.MULTILINE)))
    assert listed == app_run_config(PROJECT)  # every key, with pyproject.toml's default
    assert set(listed) == set(RunConfig().to_run_config())
    assert FLOWER_MESSAGE in section and "python -m fedcifar_app.config --run-config" in section


def test_flower_refuses_a_misspelt_key_before_the_app_runs(tmp_path: Path, flwr_env):
    """What the troubleshooting page quotes is what `flwr run .` prints; no run folder is made."""
    run = run_flwr(tmp_path / "out", "learning_rate=0.01 dataset='synthetic'", env=flwr_env, timeout=120)
    assert FLOWER_MESSAGE in run.output, run.log_tail()
    assert run.folder is None
