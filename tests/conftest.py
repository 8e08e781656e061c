"""Shared test fixtures and real `flwr run .` subprocesses; the dataset writers are in support/datasets.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomli

# The dataset writers live in tests/support/datasets.py; re-exported for tests that import them from here.
from support.datasets import encode_image, make_parquet_dataset, write_parquet_split  # noqa: F401

from fedcifar_app.centralized import _flatten as flatten  # one flattener for pyproject tables

PROJECT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SMALL_NODES = "min-train-nodes=3 min-evaluate-nodes=2 min-available-nodes=3"


def federation_override(num_supernodes: int) -> str:
    """`--federation-config` for the default federation with ``num_supernodes``, every other option kept.

    flwr 1.25 replaces the whole ``options`` table with the override's (``fuse_dicts``
    assigns the override after merging), so "options.num-supernodes=3" alone would drop
    client-resources (back to Flower's 2 CPUs per client: one client at a time here) and
    init-args. Restating all options keeps the run what pyproject.toml describes.
    """
    federations = tomli.loads((PROJECT / "pyproject.toml").read_text())["tool"]["flwr"]["federations"]
    options = {**flatten(federations[federations["default"]]["options"]), "num-supernodes": num_supernodes}

    def literal(value) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        return f"'{value}'" if isinstance(value, str) else repr(value)

    return " ".join(f"options.{key}={literal(value)}" for key, value in options.items())


# Small federations keep end-to-end runs to seconds; one string, since flwr refuses a key given twice.
SMALL_FEDERATION = federation_override(3)


@dataclass
class FlwrRun:
    returncode: int
    output: str
    run_folder: Path | None

    @property
    def status(self) -> dict:
        return json.loads((self.run_folder / "status.json").read_text())

    @property
    def metrics(self) -> list[dict]:
        return json.loads((self.run_folder / "metrics.json").read_text())


def run_flwr(
    output_dir: Path,
    run_config: str,
    *,
    federation_config: str = SMALL_FEDERATION,
    env: dict | None = None,
    timeout: float = 240,
    extra_args: tuple[str, ...] = (),
) -> FlwrRun:
    """`flwr run .` in its own process group (a killed CLI leaves Ray running otherwise).

    flwr 1.25 exits 0 even when the ServerApp fails, so callers judge the run by its folder.
    """
    before = set(output_dir.iterdir()) if output_dir.exists() else set()
    command = [str(BIN / "flwr"), "run", ".", *extra_args, "--run-config", f"{run_config} output-dir='{output_dir}'"]
    if federation_config:
        command += ["--federation-config", federation_config]
    process = subprocess.Popen(
        command,
        cwd=PROJECT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"flwr run did not finish within {timeout}s:\n{output[-4000:]}")
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # Ray / flower-simulation leftovers
        except ProcessLookupError:
            pass
    new = sorted(set(output_dir.iterdir()) - before) if output_dir.exists() else []
    return FlwrRun(process.returncode, output, new[-1] if new else None)


@pytest.fixture
def flwr_env(tmp_path_factory) -> dict:
    """An environment whose decoded-data cache is private to the test session."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["FEDCIFAR_CACHE_DIR"] = str(tmp_path_factory.getbasetemp() / "fedcifar-cache")
    return env


@pytest.fixture(autouse=True)
def private_cache(monkeypatch, tmp_path_factory):
    """In-process tests never touch the user's cache."""
    monkeypatch.setenv("FEDCIFAR_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "fedcifar-cache"))
