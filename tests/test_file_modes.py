"""File modes: what the app writes for others to read (a run folder, the decode cache, a deploy folder's
state, logs, certificates and public keys) gets the mode a plain ``open()``/``mkdir`` gives it under the
user's umask; private keys (the CA's, the SuperLink's, each SuperNode's) stay 0600 on purpose."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from support.datasets import make_parquet_dataset
from support.flwr_run import SMALL_NODES
from support.inprocess import run_inprocess

from fedcifar_app.data import load_split
from fedcifar_app.data.cache import cache_entries
from fedcifar_app.deploy.certificates import ensure_node_key, ensure_tls_files
from fedcifar_app.deploy.flwr_cli import write_control_project
from fedcifar_app.deploy.processes import start_process
from fedcifar_app.deploy.state import DeploymentState, save_state, state_path
from fedcifar_app.files import atomic_write_bytes
from fedcifar_app.pyproject import parse_overrides

RUN_FOLDER_FILES = {
    "config.json",
    "metrics.json",
    "status.json",
    "checkpoint.pt",
    "best_model.pt",
    "final_model.pt",
    "curves.png",
    "samples.png",
    "run.log",
}


@pytest.fixture(params=[0o022, 0o027], ids=["umask-022", "umask-027"])
def umask(request) -> int:
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def modes(folder: Path) -> dict[str, int]:
    return {path.name: mode(path) for path in folder.iterdir()}


def test_every_file_of_a_run_folder_gets_the_mode_of_a_plain_open(tmp_path, umask):
    values = parse_overrides(f"{SMALL_NODES} num-server-rounds=1 dataset='synthetic' output-dir='{tmp_path / 'out'}'")
    folder = run_inprocess(values)
    found = modes(folder)
    events = [name for name in found if name.startswith("events.out.tfevents.")]
    assert set(found) == RUN_FOLDER_FILES | set(events) and len(events) == 1, sorted(found)
    assert found == dict.fromkeys(found, 0o666 & ~umask), {name: oct(value) for name, value in found.items()}
    assert mode(folder) == 0o777 & ~umask


def test_a_rewritten_file_keeps_its_mode(tmp_path, umask):
    target = tmp_path / "status.json"
    atomic_write_bytes(target, b"{}")
    assert mode(target) == 0o666 & ~umask
    target.chmod(0o640)  # someone made it group-readable only
    atomic_write_bytes(target, b'{"status": "running"}')
    assert mode(target) == 0o640 and target.read_bytes() == b'{"status": "running"}'


def test_decode_cache_entries_get_the_mode_of_a_plain_mkdir(tmp_path, umask, monkeypatch):
    """A cache shared by the accounts of a machine (FEDCIFAR_CACHE_DIR=/srv/cache): not 0700."""
    monkeypatch.setenv("FEDCIFAR_CACHE_DIR", str(tmp_path / "cache"))
    dataset = make_parquet_dataset(tmp_path / "data", n_train=20, n_test=10)
    load_split(str(dataset), "test")
    (entry,) = cache_entries(tmp_path / "cache")
    assert mode(entry) == 0o777 & ~umask
    assert modes(entry) == dict.fromkeys(("images.npy", "labels.npy", "meta.json"), 0o666 & ~umask)


def test_deploy_folder_keys_stay_private_and_everything_else_is_readable(tmp_path, umask):
    readable, private = 0o666 & ~umask, 0o600
    tls = ensure_tls_files(tmp_path / "certs", ["localhost", "127.0.0.1"])
    node_key, node_public = ensure_node_key(tmp_path / "keys", "supernode-0")
    assert {path.name: mode(path) for path in (tls.ca_key, tls.server_key, node_key)} == dict.fromkeys(
        ("ca.key", "server.key", "supernode-0"), private
    )
    assert {
        path.name: mode(path) for path in (tls.ca_certificate, tls.server_certificate, node_public)
    } == dict.fromkeys(("ca.crt", "server.pem", "supernode-0.pub"), readable)

    state = DeploymentState(str(tmp_path), "now", str(tmp_path), True, False, "a:1", "a:2", "a:3")
    save_state(state)
    control = write_control_project(tmp_path / "control", "127.0.0.1:9093", tls.ca_certificate)
    process = start_process("true", ["true"], tmp_path / "logs" / "true.log", tmp_path, os.environ)
    process.wait(timeout=30)
    written = [state_path(tmp_path), control / "pyproject.toml", tmp_path / "logs" / "true.log"]
    assert {path.name: mode(path) for path in written} == {path.name: readable for path in written}
