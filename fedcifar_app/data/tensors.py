"""What the data package hands out: uint8 image tensors, a node's two splits, and its one error type."""

from __future__ import annotations

from dataclasses import dataclass

import torch

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


@dataclass(frozen=True)
class ImageTensors:
    """Images as uint8 [N, 3, 32, 32] and labels as int64 [N]."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class NodeSplits:
    """One node's data: what it trains on and what it validates on."""

    train: ImageTensors
    val: ImageTensors


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> float in [-1, 1], the tutorial's Normalize((0.5,)*3, (0.5,)*3), on a whole batch."""
    return images.float().div_(127.5).sub_(1.0)
