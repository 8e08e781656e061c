"""Fixtures every test file gets; helpers are imported from tests/support/ modules."""

from __future__ import annotations

import pytest
from support.flwr_run import flwr_environment


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
