"""Shared test helpers: small CIFAR-shaped datasets on disk and real `flwr run .` subprocesses."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The dataset writers live in tests/support/datasets.py; re-exported for tests that import them from here.
from support.datasets import encode_image, make_parquet_dataset, write_parquet_split  # noqa: F401
from support.flwr_run import PROJECT, FlwrRun, flwr_environment, small_federation
from support.flwr_run import run_flwr as support_run_flwr

__all__ = [
    "PROJECT",
    "encode_image",
    "make_parquet_dataset",
    "write_parquet_split",
    "SMALL_FEDERATION",
    "SMALL_NODES",
    "federation_override",
    "run_flwr",
]

SMALL_NODES = "min-train-nodes=3 min-evaluate-nodes=2 min-available-nodes=3"
federation_override = small_federation

# Small federations keep end-to-end runs to seconds; one string, since flwr refuses a key given twice.
SMALL_FEDERATION = federation_override(3)


def run_flwr(
    output_dir: Path,
    run_config: str,
    *,
    federation_config: str = SMALL_FEDERATION,
    env: dict | None = None,
    timeout: float = 240,
    extra_args: tuple[str, ...] = (),
) -> FlwrRun:
    """`flwr run .` to the end on the small federation (see tests/support/flwr_run.py)."""
    return support_run_flwr(
        output_dir,
        run_config,
        env=env if env is not None else dict(os.environ),
        federation_config=federation_config,
        timeout=timeout,
        extra_args=extra_args,
    )


@pytest.fixture
def flwr_env(tmp_path_factory) -> dict:
    """An environment whose decoded-data cache is private to the test session."""
    return flwr_environment(tmp_path_factory.getbasetemp() / "fedcifar-cache")


@pytest.fixture(autouse=True)
def private_cache(monkeypatch, tmp_path_factory):
    """In-process tests never touch the user's cache."""
    monkeypatch.setenv("FEDCIFAR_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "fedcifar-cache"))


def pytest_collection_modifyitems(items) -> None:
    """Every test that runs a real `flwr run` (it takes the `flwr_env` fixture) is slow."""
    for item in items:
        if "flwr_env" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
