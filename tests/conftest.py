"""Shared test helpers: small CIFAR-shaped datasets on disk and real `flwr run .` subprocesses."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from support.flwr_run import PROJECT, FlwrRun, flwr_environment, small_federation
from support.flwr_run import run_flwr as support_run_flwr

__all__ = ["PROJECT", "SMALL_FEDERATION", "SMALL_NODES", "federation_override", "run_flwr"]

SMALL_NODES = "min-train-nodes=3 min-evaluate-nodes=2 min-available-nodes=3"
federation_override = small_federation

# Small federations keep end-to-end runs to seconds; one string, since flwr refuses a key given twice.
SMALL_FEDERATION = federation_override(3)


def encode_image(pixels: np.ndarray, image_format: str = "JPEG") -> bytes:
    """HWC uint8 -> encoded bytes, as the hub's CIFAR-10 stores them."""
    from PIL import Image

    buffer = io.BytesIO()
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[pixels.shape[2]]
    Image.fromarray(pixels.squeeze(2) if mode == "L" else pixels, mode=mode).save(buffer, format=image_format)
    return buffer.getvalue()


def write_parquet_split(path: Path, images: list[bytes], labels: list[int]) -> None:
    """One parquet file in the uoft-cs/cifar10 schema: img={bytes, path}, label."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    img = pa.array(
        [{"bytes": b, "path": None} for b in images], type=pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    )
    pq.write_table(pa.table({"img": img, "label": pa.array(labels, pa.int64())}), path)


def make_parquet_dataset(
    folder: Path,
    n_train: int = 120,
    n_test: int = 40,
    *,
    size: int = 32,
    channels: int = 3,
    image_format: str = "JPEG",
    label_offset: int = 0,
    seed: int = 0,
) -> Path:
    """A learnable little CIFAR-shaped dataset (class = dominant colour block) as train/test parquet."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = [i % 10 for i in range(n)]
        images = []
        for label in labels:
            pixels = rng.integers(0, 60, size=(size, size, channels), dtype=np.uint8)
            pixels[(label * 3) % size : (label * 3) % size + 4, :, :] = 250
            images.append(encode_image(pixels, image_format))
        write_parquet_split(
            folder / f"{split}-00000-of-00001.parquet", images, [value + label_offset for value in labels]
        )
    return folder


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
