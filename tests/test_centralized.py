"""The centralized baseline (`fedcifar-centralized`) on synthetic data: fast, no Flower processes."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from support.flwr_run import BIN, PROJECT

from fedcifar_app import centralized
from fedcifar_app.config import RunConfig
from fedcifar_app.errors import ConfigError
from fedcifar_app.pyproject import app_run_config, parse_overrides

EPOCH_LINE = re.compile(r"^epoch (\d+)/(\d+)  train-loss [\d.]+  validation loss ([\d.]+)  accuracy ([\d.]+)", re.M)
TEST_LINE = re.compile(r"^Final test set performance: loss ([\d.]+), accuracy ([\d.]+)$", re.M)


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FEDCIFAR_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


def write_app(folder: Path, config_lines: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(f"[tool.flwr.app.config]\n{config_lines}\n")
    return folder


def test_trains_on_one_partition_and_reports_each_epoch(capsys):
    code = centralized.main(
        [
            "--app",
            str(PROJECT),
            "--run-config",
            "dataset='synthetic'",
            "--num-partitions",
            "2",
            "--epochs",
            "2",
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    epochs = EPOCH_LINE.findall(out)
    assert [(e, n) for e, n, _, _ in epochs] == [("1", "2"), ("2", "2")]
    test = TEST_LINE.search(out)
    assert test is not None, out
    # 800 synthetic images, 2 epochs: well above chance (0.1) on the held-out test split.
    assert float(test.group(2)) > 0.5
    assert "partition 0/2 of synthetic: 800 training / 200 validation images, 500 test images" in out


def test_same_settings_give_the_same_numbers():
    config = RunConfig.from_run_config({"dataset": "synthetic"})
    runs = [
        centralized.run_centralized(
            config, partition_id=1, num_partitions=4, epochs=1, report=lambda _: None, progress=False
        )
        for _ in range(2)
    ]
    numbers = [[(e.train_loss, e.val_loss, e.val_accuracy) for e in run.epochs] + [run.test_accuracy] for run in runs]
    assert numbers[0] == numbers[1]
    assert runs[0].num_train + runs[0].num_val == 500


def test_command_line_overrides_pyproject(tmp_path, capsys):
    app = write_app(tmp_path / "app", "dataset = 'synthetic'\nbatch-size = 16\nseed = 7")
    assert centralized.build_config(app, "").batch_size == 16
    config = centralized.build_config(app, "batch-size=64 learning-rate=0.01")
    assert (config.batch_size, config.learning_rate, config.seed, config.dataset) == (64, 0.01, 7, "synthetic")
    code = centralized.main(
        ["--app", str(app), "--run-config", "batch-size=64", "--epochs", "1", "--num-partitions", "5", "--no-progress"]
    )
    assert code == 0
    assert "batch-size 64" in capsys.readouterr().out


def test_reads_this_apps_pyproject():
    config = centralized.build_config(PROJECT, "dataset='synthetic'")
    assert config.dataset == "synthetic"
    assert config == RunConfig.from_run_config({**app_run_config(PROJECT), "dataset": "synthetic"})


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--run-config", "batch-size=0"], "run-config batch-size=0 is not allowed"),
        (["--run-config", "learning-rate='fast'"], "learning-rate='fast' is not allowed: use a number"),
        (["--run-config", "epochs=3"], "unknown run-config key(s) epochs"),
        (["--run-config", "dataset=synthetic"], "strings need quotes: dataset='synthetic'"),
        (["--run-config", "seed=1 seed=2"], "seed is given twice"),
        (["--run-config", "nonsense"], "cannot read 'nonsense'"),
        (["--run-config", "dataset='./no/such/folder'"], "no such folder"),
        (["--partition-id", "10"], "--partition-id 10: use an integer in 0..9"),
        (["--num-partitions", "0"], "--num-partitions 0"),
        (["--epochs", "0"], "--epochs 0"),
    ],
)
def test_bad_values_give_one_error_line(args, message, capsys):
    code = centralized.main(["--app", str(PROJECT), *args])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("fedcifar-centralized: error: ")
    assert message in lines[0]
    assert captured.out == ""


def test_missing_or_foreign_pyproject(tmp_path, capsys):
    assert centralized.main(["--app", str(tmp_path)]) == 2
    assert "no pyproject.toml" in capsys.readouterr().err
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    assert centralized.main(["--app", str(tmp_path)]) == 2
    assert "no [tool.flwr.app.config] table" in capsys.readouterr().err
    (tmp_path / "pyproject.toml").write_text("[tool.flwr.app.config\n")
    assert centralized.main(["--app", str(tmp_path)]) == 2
    assert "not valid TOML" in capsys.readouterr().err


def test_override_parser_uses_flwr_syntax():
    parsed = parse_overrides(
        "dataset='../shared/data/cifar10' batch-size=64 learning-rate=0.01 verbose=true output-dir=\"out dir\""
    )
    assert parsed == {
        "dataset": "../shared/data/cifar10",
        "batch-size": 64,
        "learning-rate": 0.01,
        "verbose": True,
        "output-dir": "out dir",
    }
    assert parse_overrides("") == {}
    with pytest.raises(ConfigError):
        RunConfig.from_run_config({**parsed, "batch-size": -1})


def test_console_script_runs(tmp_path):
    """The installed entry point, as a user types it, from the app folder (the default --app)."""
    script = BIN / "fedcifar-centralized"
    if not script.exists():
        pytest.skip("fedcifar-centralized is not installed in this environment")
    env = {**os.environ, "FEDCIFAR_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run(
        [str(script), "--run-config", "dataset='synthetic'", "--epochs", "1", "--num-partitions", "10"],
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert len(EPOCH_LINE.findall(done.stdout)) == 1 and TEST_LINE.search(done.stdout)
