"""Shared test helpers: small CIFAR-shaped datasets on disk and real `flwr run .` subprocesses."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from fedcifar_app import app_config

PROJECT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SMALL_NODES = "min-train-nodes=3 min-evaluate-nodes=2 min-available-nodes=3"


def federation_override(num_supernodes: int) -> str:
    """`--federation-config` for the default federation with ``num_supernodes``, every other option kept."""
    return app_config.federation_override(PROJECT, num_supernodes=num_supernodes)


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


def pytest_collection_modifyitems(items) -> None:
    """Every test that runs a real `flwr run` (it takes the `flwr_env` fixture) is slow."""
    for item in items:
        if "flwr_env" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
