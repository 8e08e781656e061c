"""The run folder's relatives: every other place the app writes (or reads back) files ends an OSError in
one line naming the file and the fix, never a traceback: fedcifar-compare --out, the decode cache on a
full disk (a real tmpfs: it used to be a SIGBUS), fedcifar-cache, fedcifar-deploy's folder, and reading
a resumed or compared folder that cannot be read."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from support.datasets import make_parquet_dataset
from support.faults import FaultyDisk, fail_path_call, private_tmpfs_problem

from fedcifar_app.config import RunConfig
from fedcifar_app.data import cache_cli
from fedcifar_app.deploy import cli as deploy_cli
from fedcifar_app.deploy.state import DeploymentState, save_state, state_path
from fedcifar_app.errors import ConfigError
from fedcifar_app.model import new_model
from fedcifar_app.runs import compare
from fedcifar_app.runs.folder import read_rows
from fedcifar_app.runs.recorder import RunRecorder
from fedcifar_app.server.run import load_resumed

FULL = "the disk is full (No space left on device)"


@pytest.fixture
def disk(monkeypatch) -> FaultyDisk:
    return FaultyDisk(monkeypatch)


def finished_run(folder: Path, seed: int = 42) -> Path:
    folder.mkdir(parents=True)
    recorder = RunRecorder.start(folder, RunConfig(dataset="synthetic", seed=seed), None)
    recorder.finish_round(0, 2.3, 0.1, new_model(0).state_dict())
    recorder.set_status("completed")
    return folder


def refuse_reading(monkeypatch, name: str) -> None:
    """Reading the file called ``name`` fails with EACCES, as for a file its owner made unreadable."""
    fail_path_call(monkeypatch, "read_text", lambda path: path.name == name, errno.EACCES)


# --------------------------------------------------------------------------- fedcifar-compare


@pytest.mark.parametrize(
    ("name", "code", "says"),
    [
        ("comparison.png", errno.ENOSPC, f"{FULL}; free space on it"),
        ("comparison.md", errno.EROFS, "the file system is read-only (Read-only file system); remount it read-write"),
    ],
)
def test_compare_on_a_full_or_read_only_out_folder_is_one_line(tmp_path, disk, capsys, name, code, says):
    runs = [finished_run(tmp_path / "a"), finished_run(tmp_path / "b", seed=7)]
    out = tmp_path / "out"
    disk.fail(name, code)
    assert compare.main([*map(str, runs), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"fedcifar-compare: error: cannot write {out / name}: {says}, or pass another --out\n"
    assert sorted(path.name for path in out.iterdir()) == (["comparison.png"] if name == "comparison.md" else [])


def test_compare_names_a_run_folder_file_it_cannot_read(tmp_path, monkeypatch):
    run = finished_run(tmp_path / "a")
    refuse_reading(monkeypatch, "config.json")
    with pytest.raises(ConfigError, match=r"config.json cannot be read \(Permission denied\): make it readable"):
        compare.load_run(run)
    monkeypatch.undo()
    refuse_reading(monkeypatch, "metrics.json")
    with pytest.raises(ConfigError, match=r"metrics.json cannot be read \(Permission denied\); make it readable"):
        read_rows(run)


def test_resume_from_a_folder_whose_status_cannot_be_read_is_one_line(tmp_path, monkeypatch):
    run = finished_run(tmp_path / "a")
    refuse_reading(monkeypatch, "status.json")
    with pytest.raises(ConfigError) as caught:
        load_resumed(RunConfig(dataset="synthetic", num_server_rounds=3, resume_from=str(run)))
    assert str(caught.value) == (
        f"run-config resume-from={str(run)!r}: {run / 'status.json'} cannot be read (Permission denied); make it readable"
    )


# --------------------------------------------------------------------------- the decode cache and fedcifar-cache


def test_fedcifar_cache_that_cannot_remove_its_folder_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FEDCIFAR_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "cache" / "entry").mkdir(parents=True)

    def rmtree(path, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    assert cache_cli.main(["clear"]) == 2
    assert capsys.readouterr().err == (
        f"fedcifar-cache: error: {tmp_path / 'cache'}: the file system is read-only (Read-only file system); "
        "remount it read-write\n"
    )


@pytest.mark.skipif(bool(private_tmpfs_problem()), reason=private_tmpfs_problem() or "ok")
def test_a_full_cache_disk_is_one_data_error_not_a_sigbus(tmp_path):
    """Decoding 200 images (600 KB) into a 256 KB tmpfs (mounted in a private mount namespace): the
    memory-mapped images file used to be sparse, so the kernel killed the process with SIGBUS when a
    page found no room. Now its blocks are reserved first and the run gets one DataError."""
    dataset = make_parquet_dataset(tmp_path / "data", n_train=200, n_test=20)
    cache = tmp_path / "cache"
    cache.mkdir()
    script = textwrap.dedent(
        f"""
        from fedcifar_app.data import load_split
        from fedcifar_app.errors import DataError
        try:
            load_split({str(dataset)!r}, "train")
        except DataError as err:
            print(err)
        import os
        print(sorted(os.listdir({str(cache)!r})))
        """
    )
    result = subprocess.run(
        ["unshare", "-m", "sh", "-c", 'mount -t tmpfs -o size=256k tmpfs "$0" && exec "$@"', str(cache)]
        + [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "FEDCIFAR_CACHE_DIR": str(cache)},
        timeout=120,
    )
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])  # -7 was the SIGBUS
    message, listing = result.stdout.strip().splitlines()
    assert message == (
        f"the decode cache folder {cache} cannot be written: {FULL}; free space on it, "
        "or set FEDCIFAR_CACHE_DIR to a writable folder with free space"
    )
    assert all(name.endswith(".lock") for name in json.loads(listing.replace("'", '"'))), listing  # no half entry


# --------------------------------------------------------------------------- fedcifar-deploy's folder


def test_a_deploy_state_that_cannot_be_written_names_its_file(tmp_path, disk):
    state = DeploymentState(str(tmp_path), "now", str(tmp_path), False, False, "a:1", "a:2", "a:3")
    disk.fail("state.json", errno.ENOSPC)
    with pytest.raises(OSError) as caught:
        save_state(state)
    assert caught.value.filename == str(state_path(tmp_path))  # the target, not the temporary file
    assert list(tmp_path.iterdir()) == []


def test_fedcifar_deploy_on_a_full_disk_is_one_line(tmp_path, monkeypatch, capsys):
    """`fedcifar-deploy key PATH` (any command that writes into its folder) on a full disk."""

    def write_bytes(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    key = tmp_path / "keys" / "site-a"
    assert deploy_cli.main(["key", str(key)]) == 1
    assert capsys.readouterr().err == f"fedcifar-deploy: {key}: {FULL}; free space on it, or use another folder\n"
