"""Small CIFAR-shaped datasets the tests write themselves, in the uoft-cs/cifar10 parquet schema
(``img`` = struct{bytes, path} holding JPEG or PNG bytes, ``label`` = int64), plus PIL as the
reference decoder (torchvision's decoders match it bit for bit on these images)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedcifar_app.data import ImageTensors, load_split


def encode_image(pixels: np.ndarray, image_format: str = "JPEG", quality: int = 75) -> bytes:
    """HWC uint8 (1, 3 or 4 channels) -> encoded bytes, as the hub's CIFAR-10 stores them."""
    from PIL import Image

    buffer = io.BytesIO()
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[pixels.shape[2]]
    options = {"quality": quality} if image_format == "JPEG" else {}
    Image.fromarray(pixels.squeeze(2) if mode == "L" else pixels, mode=mode).save(
        buffer, format=image_format, **options
    )
    return buffer.getvalue()


def pil_decode(encoded: bytes) -> np.ndarray:
    """The reference decoder: PIL, to CHW uint8 RGB."""
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB")).transpose(2, 0, 1)


def write_parquet_split(path: Path, images: list[bytes], labels: list[int], row_group_size: int | None = None) -> None:
    """One parquet file in the uoft-cs/cifar10 schema; small row groups give multi-chunk columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    img_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    img = pa.array([{"bytes": b, "path": None} for b in images], type=img_type)
    pq.write_table(pa.table({"img": img, "label": pa.array(labels, pa.int64())}), path, row_group_size=row_group_size)


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


def make_rows(count: int, seed: int, png_every: int = 5) -> tuple[list[bytes], list[int]]:
    """Distinct, class-dependent 32x32 images (so rows identify themselves), mostly JPEG, some PNG."""
    rng = np.random.default_rng(seed)
    encoded, labels = [], []
    for row in range(count):
        label = row % 10
        image = np.clip(rng.normal(25 * label + 10, 40, size=(32, 32, 3)), 0, 255).astype(np.uint8)
        encoded.append(encode_image(image, "PNG" if row % png_every == png_every - 1 else "JPEG", quality=85))
        labels.append(label)
    return encoded, labels


@dataclass
class ParquetFolder:
    """A dataset folder and the encoded rows and labels of each split, as written."""

    path: Path
    train: tuple[list[bytes], list[int]]
    test: tuple[list[bytes], list[int]]

    @property
    def name(self) -> str:
        return str(self.path)


def make_multi_file_dataset(root: Path, train_rows: int = 200, test_rows: int = 40, seed: int = 0) -> ParquetFolder:
    """train in two files (train-0000{0,1}-of-00002.parquet), test in one; row groups of 64."""
    train = make_rows(train_rows, seed)
    test = make_rows(test_rows, seed + 1000)
    half = train_rows // 2
    write_parquet_split(root / "train-00000-of-00002.parquet", train[0][:half], train[1][:half], 64)
    write_parquet_split(root / "train-00001-of-00002.parquet", train[0][half:], train[1][half:], 64)
    write_parquet_split(root / "test-00000-of-00001.parquet", *test, 64)
    return ParquetFolder(root, train, test)


def make_image_folder(
    root: Path, class_names: tuple[str, ...], image_format: str, seed: int, per_class: int = 3
) -> Path:
    """An image folder dataset: ``root/<split>/<class>/<i>.png|jpg`` with random 32x32 images."""
    rng = np.random.default_rng(seed)
    suffix = "png" if image_format == "PNG" else "jpg"
    for split in ("train", "test"):
        for name in class_names:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
                (folder / f"{i}.{suffix}").write_bytes(encode_image(pixels, image_format))
    return root


def small_synthetic(n: int) -> ImageTensors:
    """The first ``n`` images of the app's synthetic training split, in memory."""
    data = load_split("synthetic", "train")
    return ImageTensors(data.images[:n], data.labels[:n])
