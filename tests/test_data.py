"""Data sources, partitioning and node splits, on small data the tests write."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support.datasets import encode_image, make_image_folder, make_parquet_dataset, write_parquet_split

from fedcifar_app.config import NodeData, Partitioner, RunConfig
from fedcifar_app.data import (
    CIFAR10_CLASSES,
    FolderKind,
    LocalFolder,
    class_names,
    load_node_data,
    load_split,
    resolve_source,
)
from fedcifar_app.errors import DataError


def rows_of(split) -> set[bytes]:
    return {bytes(image.numpy().tobytes()) for image in split.images}


def test_synthetic_is_deterministic_and_balanced():
    first, second = load_split("synthetic", "train"), load_split("synthetic", "train")
    assert torch.equal(first.images, second.images) and first.images.dtype == torch.uint8
    assert first.images.shape[1:] == (3, 32, 32)
    assert torch.bincount(first.labels).tolist() == [200] * 10


def test_parquet_folder_loads_in_the_cifar_schema(tmp_path):
    make_parquet_dataset(tmp_path / "cifar", n_train=30, n_test=10)
    train, test = load_split(str(tmp_path / "cifar"), "train"), load_split(str(tmp_path / "cifar"), "test")
    assert (len(train), len(test)) == (30, 10)
    assert train.images.shape == (30, 3, 32, 32) and train.labels.tolist()[:3] == [0, 1, 2]
    assert resolve_source(str(tmp_path / "cifar")) == LocalFolder(tmp_path / "cifar", FolderKind.PARQUET)


def test_png_images_and_save_to_disk_folders_load_too(tmp_path):
    datasets = pytest.importorskip("datasets")
    pixels = np.random.default_rng(0).integers(0, 255, size=(6, 32, 32, 3), dtype=np.uint8)
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=list(CIFAR10_CLASSES))})
    split = {"img": [{"bytes": encode_image(p, "PNG"), "path": None} for p in pixels], "label": [1, 2, 3, 4, 5, 6]}
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(split, features=features),
            "test": datasets.Dataset.from_dict(split, features=features),
        }
    ).save_to_disk(tmp_path / "saved")
    loaded = load_split(str(tmp_path / "saved"), "train")
    assert torch.equal(loaded.images, torch.from_numpy(pixels).permute(0, 3, 1, 2))  # PNG is lossless
    assert loaded.labels.tolist() == [1, 2, 3, 4, 5, 6]


def test_image_folder_labels_come_from_sorted_class_folders(tmp_path):
    make_image_folder(tmp_path / "images", ("cat", "airplane"), "PNG", seed=1)
    train = load_split(str(tmp_path / "images"), "train")
    assert sorted(train.labels.tolist()) == [0, 0, 0, 1, 1, 1]
    assert class_names(str(tmp_path / "images")) == ("airplane", "cat")


def test_iid_partitions_are_disjoint_cover_the_split_and_repeat_for_a_seed():
    config = RunConfig(dataset="synthetic", seed=3)
    nodes = [load_node_data(config, NodeData(i, 4)) for i in range(4)]
    seen = [rows_of(n.train) | rows_of(n.val) for n in nodes]
    assert sum(len(s) for s in seen) == len(load_split("synthetic", "train"))
    assert all(not (seen[i] & seen[j]) for i in range(4) for j in range(i + 1, 4))
    assert all(len(n.val) == round(500 * 0.2) for n in nodes)
    again = load_node_data(RunConfig(dataset="synthetic", seed=3), NodeData(2, 4))
    assert torch.equal(again.train.images, nodes[2].train.images)
    other_seed = load_node_data(RunConfig(dataset="synthetic", seed=4), NodeData(2, 4))
    assert not torch.equal(other_seed.train.labels, nodes[2].train.labels)


def test_dirichlet_partitions_are_label_skewed_and_seeded():
    config = RunConfig(dataset="synthetic", partitioner=Partitioner.DIRICHLET, dirichlet_alpha=0.1)
    counts = [torch.bincount(load_node_data(config, NodeData(i, 5)).train.labels, minlength=10) for i in range(5)]
    assert max(int(c.max()) / int(c.sum()) for c in counts) > 0.4  # skewed, unlike IID's ~0.1
    repeat = load_node_data(config, NodeData(0, 5))
    assert torch.equal(torch.bincount(repeat.train.labels, minlength=10), counts[0])


def test_changed_partition_count_never_returns_stale_partitions():
    ten = load_node_data(RunConfig(dataset="synthetic"), NodeData(0, 10))
    five = load_node_data(RunConfig(dataset="synthetic"), NodeData(0, 5))
    assert len(five.train) + len(five.val) == 2 * (len(ten.train) + len(ten.val))


def test_data_path_node_uses_its_own_folder(tmp_path):
    make_parquet_dataset(tmp_path / "org", n_train=50, n_test=10)
    node = load_node_data(RunConfig(dataset="synthetic"), NodeData(data_path=str(tmp_path / "org")))
    assert (len(node.train), len(node.val)) == (40, 10)


@pytest.mark.parametrize("name", ["./no/such/folder", "/definitely/not/here"])
def test_missing_local_path_is_an_error_not_a_hub_lookup(name):
    with pytest.raises(DataError, match="no such folder"):
        resolve_source(name)


# --------------------------------------------------------------------------- damaged user files


def test_a_corrupt_image_in_an_image_folder_is_refused_naming_the_file(tmp_path):
    make_image_folder(tmp_path / "images", ("cat", "dog"), "JPEG", seed=2)
    broken = tmp_path / "images" / "train" / "dog" / "1.jpg"
    whole = broken.read_bytes()
    broken.write_bytes(whole[: len(whole) // 2])  # cut short, as an interrupted copy leaves it

    with pytest.raises(DataError) as caught:
        load_split(str(tmp_path / "images"), "train")
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{broken} is not a readable image")
    assert "truncated" in message and "replace or delete that file" in message
    assert "cpp" not in message, "no C++ source locations in a user's message"
    assert broken.read_bytes() == whole[: len(whole) // 2], "the user's file is never touched"


def test_a_row_that_does_not_decode_in_parquet_is_refused_naming_file_and_row(tmp_path):
    pixels = np.random.default_rng(3).integers(0, 255, size=(6, 32, 32, 3), dtype=np.uint8)
    images = [encode_image(p) for p in pixels]
    images[4] = images[4][:100]  # a JPEG cut short inside the file
    file = tmp_path / "bad" / "train-00000-of-00001.parquet"
    write_parquet_split(file, images, [0, 1, 2, 3, 4, 5])
    write_parquet_split(tmp_path / "bad" / "test-00000-of-00001.parquet", images[:2], [0, 1])

    with pytest.raises(DataError) as caught:
        load_split(str(tmp_path / "bad"), "train")
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{file}: row 4 is not a readable image")
    assert "re-encode that row or remove it" in message


def test_an_empty_label_in_parquet_is_refused_naming_the_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = [encode_image(p) for p in np.zeros((3, 32, 32, 3), np.uint8)]
    img = pa.array([{"bytes": b, "path": None} for b in images])
    file = tmp_path / "nolabel" / "train-00000-of-00001.parquet"
    file.parent.mkdir()
    pq.write_table(pa.table({"img": img, "label": pa.array([0, None, 2], pa.int64())}), file)
    with pytest.raises(DataError, match=r"train-00000-of-00001.parquet: column 'label' has 1 empty row"):
        load_split(str(file.parent), "train")
