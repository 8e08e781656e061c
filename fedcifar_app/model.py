"""The tutorial CNN (PyTorch 60-minute blitz), unchanged so results compare with Flower's tutorial."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NUM_CLASSES = 10
IMAGE_SHAPE = (3, 32, 32)


class Net(nn.Module):
    """Two conv layers and three fully connected layers: ~62k parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def new_model(seed: int) -> Net:
    """A freshly initialised model whose weights depend on ``seed`` alone."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return Net()
    finally:
        torch.random.set_rng_state(generator_state)
