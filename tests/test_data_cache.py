"""The decode-once cache: same pixels as decoding directly, keyed on everything that defines the data.

Offline and fast: every test writes its own small parquet folder in the uoft-cs/cifar10 schema
(tests/support/datasets.py) and its own cache folder (FEDCIFAR_CACHE_DIR under tmp_path). The
reference decoder is PIL, which the torchvision decoders match bit for bit on these images. A damaged
entry (the cache is the app's own) must be rebuilt, never served.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from support.datasets import (
    ParquetFolder,
    encode_image,
    make_multi_file_dataset,
    make_rows,
    pil_decode,
    write_parquet_split,
)
from support.flwr_run import BIN, PROJECT

from fedcifar_app import data
from fedcifar_app.config import NodeData, Partitioner, RunConfig
from fedcifar_app.data import decoding, node_data, partitions
from fedcifar_app.errors import DataError

# torchvision 0.29 deprecates its decoders on every call (data/decoding.py filters it; pytest resets filters).
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")
SUBPROCESS_TIMEOUT_S = 120


# --------------------------------------------------------------------------- helpers


def entries(cache: Path) -> list[Path]:
    """Complete cache entries (a folder with meta.json)."""
    return sorted(p for p in cache.glob("*") if (p / "meta.json").exists()) if cache.exists() else []


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("FEDCIFAR_CACHE_DIR", str(cache))
    data.reset_process_caches()
    yield cache
    data.reset_process_caches()


@pytest.fixture
def dataset(tmp_path: Path) -> ParquetFolder:
    return make_multi_file_dataset(tmp_path / "cifar")


# --------------------------------------------------------------------------- same pixels


@pytest.mark.parametrize("split", ["train", "test"])
def test_cache_returns_exactly_the_pixels_pil_decodes(cache_dir: Path, dataset: ParquetFolder, split: str) -> None:
    encoded, labels = getattr(dataset, split)
    expected = np.stack([pil_decode(b) for b in encoded])

    first = data.load_split(dataset.name, split)  # decodes and writes the entry
    assert first.images.dtype == torch.uint8 and tuple(first.images.shape) == (len(encoded), 3, 32, 32)
    np.testing.assert_array_equal(first.images.numpy(), expected)
    np.testing.assert_array_equal(first.labels.numpy(), np.array(labels))
    assert first.labels.dtype == torch.int64

    data.reset_process_caches()  # as a new process would: read back from disk
    again = data.load_split(dataset.name, split)
    np.testing.assert_array_equal(again.images.numpy(), expected)
    np.testing.assert_array_equal(again.labels.numpy(), np.array(labels))
    assert len(entries(cache_dir)) == 1


def test_chunked_threaded_decode_matches_pil_and_names_the_bad_row(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small chunks force many chunks across threads: same pixels, and errors name the global row."""
    monkeypatch.setattr(decoding, "DECODE_CHUNK", 7)
    monkeypatch.setattr(decoding, "decode_threads", lambda: 3)
    encoded, _ = make_rows(50, seed=3, png_every=4)
    np.testing.assert_array_equal(data.decode_images(encoded, "here"), np.stack([pil_decode(b) for b in encoded]))

    broken = list(encoded)
    broken[23] = b"\xff\xd8 not really a jpeg"
    with pytest.raises(DataError, match=r"here: row 23 is not a readable image"):
        data.decode_images(broken, "here")
    wrong_size = list(encoded)
    wrong_size[31] = encode_image(np.zeros((16, 24, 3), np.uint8))
    with pytest.raises(DataError, match=r"here: row 31 is a 16x24 image with 3 channel\(s\)"):
        data.decode_images(wrong_size, "here")


# --------------------------------------------------------------------------- keyed on the files


def test_rewriting_a_file_makes_a_new_entry_and_never_serves_the_old_pixels(
    cache_dir: Path, dataset: ParquetFolder
) -> None:
    before = data.load_split(dataset.name, "test")
    np.testing.assert_array_equal(before.images.numpy(), np.stack([pil_decode(b) for b in dataset.test[0]]))

    new_encoded, new_labels = make_rows(len(dataset.test[0]), seed=777)
    target = dataset.path / "test-00000-of-00001.parquet"
    old_mtime = target.stat().st_mtime_ns
    write_parquet_split(target, new_encoded, new_labels)
    os.utime(target, ns=(old_mtime + 2_000_000_000, old_mtime + 2_000_000_000))  # even on coarse clocks

    after = data.load_split(dataset.name, "test")  # same process: the lru cache must not hand back the old one
    np.testing.assert_array_equal(after.images.numpy(), np.stack([pil_decode(b) for b in new_encoded]))
    np.testing.assert_array_equal(after.labels.numpy(), np.array(new_labels))
    assert len(entries(cache_dir)) == 2

    # Node data built on the train split follows a train file's change too.
    config = RunConfig(dataset=dataset.name, val_fraction=0.25)
    node = NodeData(partition_id=0, num_partitions=2)
    old_node = data.load_node_data(config, node)
    train_file = dataset.path / "train-00001-of-00002.parquet"
    replacement = make_rows(100, seed=555)
    write_parquet_split(train_file, *replacement)
    os.utime(train_file, ns=(old_mtime + 4_000_000_000,) * 2)
    new_node = data.load_node_data(config, node)
    data.reset_process_caches()
    fresh = data.load_node_data(config, node)
    assert not torch.equal(old_node.train.images, new_node.train.images)
    assert torch.equal(new_node.train.images, fresh.train.images)
    assert torch.equal(new_node.val.images, fresh.val.images)


# --------------------------------------------------------------------------- keyed on the partition values

BASE = dict(partitioner=Partitioner.DIRICHLET, dirichlet_alpha=0.5, seed=7, val_fraction=0.2)
CHANGES = [
    pytest.param({"partitioner": Partitioner.IID}, 3, id="partitioner"),
    pytest.param({"dirichlet_alpha": 50.0}, 3, id="alpha"),
    pytest.param({"seed": 8}, 3, id="seed"),
    pytest.param({}, 4, id="num-partitions"),
    pytest.param({"val_fraction": 0.4}, 3, id="val-fraction"),
]


def node_rows(splits: data.NodeSplits) -> tuple[bytes, bytes]:
    """What a node holds, train and validation, as comparable bytes."""
    return splits.train.images.numpy().tobytes(), splits.val.images.numpy().tobytes()


@pytest.mark.parametrize(("change", "num_partitions"), CHANGES)
def test_node_data_follows_every_defining_value_and_is_never_stale(
    cache_dir: Path, dataset: ParquetFolder, change: dict, num_partitions: int
) -> None:
    config_a = RunConfig(dataset=dataset.name, **BASE)
    config_b = dataclasses.replace(config_a, **change)
    node_a = NodeData(partition_id=1, num_partitions=3)
    node_b = NodeData(partition_id=1, num_partitions=num_partitions)

    # Warm caches in the order a, b, a: each answer must equal a fresh computation.
    got_a = node_rows(data.load_node_data(config_a, node_a))
    got_b = node_rows(data.load_node_data(config_b, node_b))
    got_a_again = node_rows(data.load_node_data(config_a, node_a))
    data.reset_process_caches()
    fresh_b = node_rows(data.load_node_data(config_b, node_b))
    data.reset_process_caches()
    fresh_a = node_rows(data.load_node_data(config_a, node_a))

    assert got_a == fresh_a == got_a_again
    assert got_b == fresh_b
    assert got_a != got_b, f"changing {change or 'num-partitions'} must change the node's data"
    assert len(entries(cache_dir)) == 1, "partition values must not re-decode the split"


def test_partitions_cover_the_split_once(cache_dir: Path, dataset: ParquetFolder) -> None:
    """IID partitions plus their validation splits are a partition of the train split."""
    config = RunConfig(dataset=dataset.name, partitioner=Partitioner.IID, val_fraction=0.25, seed=3)
    parts = [data.load_node_data(config, NodeData(partition_id=i, num_partitions=4)) for i in range(4)]
    seen = [row.tobytes() for p in parts for split in (p.train, p.val) for row in split.images.numpy()]
    whole = [row.tobytes() for row in data.load_split(dataset.name, "train").images.numpy()]
    assert sorted(seen) == sorted(whole)


# --------------------------------------------------------------------------- processes and the CLI

CHILD = textwrap.dedent(
    """
    import hashlib, os, sys, time
    from pathlib import Path
    from fedcifar_app import data
    from fedcifar_app.data import cache

    count_file, ready, go = Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
    original = cache.read_split

    def counted(*args, **kwargs):
        with open(count_file, "a") as handle:
            handle.write(f"{os.getpid()}\\n")
        time.sleep(0.5)  # widen the window in which the other process would decode too
        return original(*args, **kwargs)

    cache.read_split = counted
    ready.touch()
    deadline = time.monotonic() + 60
    while not go.exists():
        if time.monotonic() > deadline:
            sys.exit("no go signal")
        time.sleep(0.01)
    split = data.load_split(sys.argv[1], "train")
    print(hashlib.sha256(split.images.numpy().tobytes() + split.labels.numpy().tobytes()).hexdigest())
    """
)


def test_two_processes_decoding_at_once_write_one_correct_entry(
    cache_dir: Path, dataset: ParquetFolder, tmp_path: Path
) -> None:
    count_file, go = tmp_path / "decodes.txt", tmp_path / "go"
    env = {**os.environ, "FEDCIFAR_CACHE_DIR": str(cache_dir), "PYTHONPATH": str(PROJECT)}
    children = []
    for i in range(2):
        ready = tmp_path / f"ready-{i}"
        children.append(
            (
                subprocess.Popen(
                    [sys.executable, "-c", CHILD, dataset.name, str(count_file), str(ready), str(go)],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                ),
                ready,
            )
        )
    try:
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
        while not all(ready.exists() for _, ready in children):
            assert time.monotonic() < deadline, "children did not start"
            assert all(p.poll() is None for p, _ in children), "a child exited early"
            time.sleep(0.02)
        go.touch()
        outputs = [p.communicate(timeout=SUBPROCESS_TIMEOUT_S) for p, _ in children]
    finally:
        for p, _ in children:
            if p.poll() is None:
                p.kill()
                p.wait()
    for (p, _), (_, err) in zip(children, outputs, strict=True):
        assert p.returncode == 0, err
    digests = {out.strip() for out, _ in outputs}

    expected = data.load_split(dataset.name, "train")  # reads the entry the children wrote
    expected_digest = hashlib.sha256(expected.images.numpy().tobytes() + expected.labels.numpy().tobytes()).hexdigest()
    assert digests == {expected_digest}
    np.testing.assert_array_equal(expected.images.numpy(), np.stack([pil_decode(b) for b in dataset.train[0]]))
    assert len(count_file.read_text().split()) == 1, "the lock must let exactly one process decode"
    assert len(entries(cache_dir)) == 1
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(".")], "no staging folder left behind"


def test_fedcifar_cache_clear_empties_the_cache(
    cache_dir: Path, dataset: ParquetFolder, capsys: pytest.CaptureFixture[str]
) -> None:
    data.load_split(dataset.name, "train")
    data.load_split(dataset.name, "test")
    assert len(entries(cache_dir)) == 2
    assert data.cache_main(["info"]) == 0
    info = capsys.readouterr().out
    assert "2 entries" in info and str(cache_dir) in info

    # The real console script, as a user types it (one subprocess: importing torch is slow).
    script = BIN / "fedcifar-cache"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "fedcifar_app.data"]
    env = {**os.environ, "FEDCIFAR_CACHE_DIR": str(cache_dir)}
    cleared = subprocess.run([*command, "clear"], env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert cleared.returncode == 0, cleared.stderr
    assert "2 entries" in cleared.stdout
    assert not cache_dir.exists() or not any(cache_dir.iterdir())
    assert data.cache_main(["info"]) == 0
    assert "0 entries" in capsys.readouterr().out

    data.reset_process_caches()  # a later load decodes again into a fresh entry
    again = data.load_split(dataset.name, "test")
    np.testing.assert_array_equal(again.images.numpy(), np.stack([pil_decode(b) for b in dataset.test[0]]))
    assert len(entries(cache_dir)) == 1


@pytest.mark.parametrize("partitioner", [Partitioner.IID, Partitioner.DIRICHLET])
def test_partition_rows_are_flwr_datasets_own(
    cache_dir: Path, dataset: ParquetFolder, partitioner: Partitioner
) -> None:
    """The fast column reads give exactly the rows flwr-datasets' partitioner gives unformatted."""
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    labels = data.load_split(dataset.name, "train").labels.numpy()
    fingerprint = node_data.node_fingerprint(dataset.name, NodeData(partition_id=0, num_partitions=3))
    for num_partitions in (3, 7):
        table = Dataset.from_dict({"label": labels, "row": np.arange(len(labels))})
        if partitioner is Partitioner.IID:
            plain = IidPartitioner(num_partitions=num_partitions)
            table = table.shuffle(seed=5)
        else:
            plain = DirichletPartitioner(
                num_partitions=num_partitions,
                partition_by="label",
                alpha=2.0,
                min_partition_size=2,
                self_balancing=False,
                shuffle=True,
                seed=5,
            )
        plain.dataset = table
        key = data.PartitionKey(dataset.name, fingerprint, partitioner, num_partitions, 2.0, 5)
        for pid in range(num_partitions):
            expected = np.array([row["row"] for row in plain.load_partition(pid)])
            np.testing.assert_array_equal(partitions.partition_rows(key, pid, len(labels)), expected)


# --------------------------------------------------------------------------- damaged entries


def cut_in_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGES = [
    pytest.param(lambda e: cut_in_half(e / "images.npy"), id="images cut short"),
    pytest.param(lambda e: (e / "images.npy").write_bytes((e / "images.npy").read_bytes()[:40]), id="header cut"),
    pytest.param(lambda e: (e / "images.npy").open("ab").write(b"\0" * 3072), id="images too long"),
    pytest.param(lambda e: cut_in_half(e / "labels.npy"), id="labels cut short"),
    pytest.param(lambda e: (e / "meta.json").write_text("{not json"), id="meta unreadable"),
    pytest.param(lambda e: (e / "meta.json").write_text('{"rows": 3}'), id="meta wrong rows"),
    pytest.param(lambda e: (e / "images.npy").unlink(), id="images missing"),
]


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_entry_is_rebuilt_with_one_warning_and_never_served(
    cache_dir: Path, dataset: ParquetFolder, damage, caplog: pytest.LogCaptureFixture
) -> None:
    expected = np.stack([pil_decode(b) for b in dataset.test[0]])
    data.load_split(dataset.name, "test")
    (entry,) = entries(cache_dir)
    damage(entry)
    data.reset_process_caches()  # as a new process would: it must check what it maps

    with caplog.at_level("WARNING"):
        again = data.load_split(dataset.name, "test")
    np.testing.assert_array_equal(again.images.numpy(), expected)
    np.testing.assert_array_equal(again.labels.numpy(), np.array(dataset.test[1]))
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "damaged" in warnings[0].getMessage(), caplog.text
    assert str(entry) in warnings[0].getMessage() and "\n" not in warnings[0].getMessage()
    assert entries(cache_dir) == [entry], "rebuilt in place"
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(".")], "the damaged copy is deleted"

    caplog.clear()
    data.reset_process_caches()
    with caplog.at_level("WARNING"):
        np.testing.assert_array_equal(data.load_split(dataset.name, "test").images.numpy(), expected)
    assert not caplog.records, "the rebuilt entry is healthy"


def test_an_entry_folder_without_meta_is_rebuilt_not_a_crash(cache_dir: Path, dataset: ParquetFolder) -> None:
    """Before, a folder without meta.json made the writer's rename fail (the folder was not empty)."""
    data.load_split(dataset.name, "test")
    (entry,) = entries(cache_dir)
    (entry / "meta.json").unlink()
    data.reset_process_caches()
    again = data.load_split(dataset.name, "test")
    np.testing.assert_array_equal(again.images.numpy(), np.stack([pil_decode(b) for b in dataset.test[0]]))
    assert entries(cache_dir) == [entry]


def test_a_cache_folder_that_cannot_be_written_is_one_line_naming_it_and_the_fix(
    tmp_path: Path, dataset: ParquetFolder, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("a file where the cache folder's parent should be")
    monkeypatch.setenv("FEDCIFAR_CACHE_DIR", str(blocker / "cache"))
    data.reset_process_caches()
    with pytest.raises(DataError) as caught:
        data.load_split(dataset.name, "test")
    message = str(caught.value)
    assert "\n" not in message and str(blocker / "cache") in message and "FEDCIFAR_CACHE_DIR" in message
