"""Train and evaluate on in-memory uint8 tensors; Flower-free so the apps, the
centralized baseline and the benchmark all run the same loops."""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .config import DeviceChoice
from .data import ImageTensors, normalize
from .errors import ConfigError

EVAL_BATCH_SIZE = 512  # evaluation keeps no activations for backward, so big batches are cheap


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    num_examples: int


def pick_device(choice: DeviceChoice) -> torch.device:
    """CUDA when asked for or available (AUTO), else CPU; a missing GPU is a clear error."""
    if choice is DeviceChoice.CUDA and not torch.cuda.is_available():
        raise ConfigError(
            "run-config device='cuda' but this machine's PyTorch sees no CUDA GPU "
            f"(torch {torch.__version__}, CUDA available: no): use device='auto' or device='cpu'"
        )
    if choice is DeviceChoice.CPU or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def train(
    model: nn.Module,
    data: ImageTensors,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    device: torch.device,
    seed: int,
    on_batch: Callable[[], None] | None = None,
    proximal_mu: float = 0.0,
) -> float:
    """Adam on shuffled mini-batches (the tutorial's setup); returns the mean training loss.

    Shuffling draws from a generator seeded with ``seed`` alone, so the same call gives the
    same batches in any process. ``proximal_mu`` > 0 adds FedProx's mu/2 * ||w - w_start||^2
    (w_start: the weights the model holds on entry, i.e. the global model), which keeps a node
    near the global model under label skew; 0 runs exactly the plain loop. The returned loss
    is the data loss alone, comparable across strategies.
    """
    if len(data) == 0:
        raise ValueError("cannot train on an empty data set")
    model.to(device).train()
    # foreach: one call per step for all 10 parameter tensors instead of ~10 small ops each; the
    # same arithmetic in the same order (bit-identical weights), ~3% less CPU per batch here.
    # (fused=True would be faster still but rounds differently, so results would change.)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate, foreach=True)
    criterion = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(seed)
    images, labels = data.images.to(device), data.labels.to(device)
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
    total_loss, total_seen = 0.0, 0
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=generator).to(device)
        for start in range(0, len(data), batch_size):
            batch = order[start : start + batch_size]
            # index_select copies whole rows; images[batch] gathers byte by byte (same values, slower).
            inputs, targets = normalize(images.index_select(0, batch)), labels.index_select(0, batch)
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(inputs), targets)
            objective = loss if anchor is None else loss + proximal_term(model, anchor, proximal_mu)
            objective.backward()
            optimizer.step()
            total_loss += loss.item() * len(batch)
            total_seen += len(batch)
            if on_batch is not None:
                on_batch()
    return total_loss / total_seen


def proximal_term(model: nn.Module, anchor: list[torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx: mu/2 * squared L2 distance between the model's parameters and ``anchor``."""
    squared = functools.reduce(
        operator.add, ((p - a).pow(2).sum() for p, a in zip(model.parameters(), anchor, strict=True))
    )
    return 0.5 * mu * squared


@torch.inference_mode()
def evaluate(model: nn.Module, data: ImageTensors, device: torch.device) -> EvalResult:
    """Mean cross-entropy and accuracy over ``data``."""
    if len(data) == 0:
        raise ValueError("cannot evaluate on an empty data set")
    model.to(device).eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    total_loss, correct = 0.0, 0
    for start in range(0, len(data), EVAL_BATCH_SIZE):
        inputs = normalize(data.images[start : start + EVAL_BATCH_SIZE].to(device))
        targets = data.labels[start : start + EVAL_BATCH_SIZE].to(device)
        outputs = model(inputs)
        total_loss += criterion(outputs, targets).item()
        correct += (outputs.argmax(1) == targets).sum().item()
    return EvalResult(loss=total_loss / len(data), accuracy=correct / len(data), num_examples=len(data))


def weights_are_finite(weights: Mapping[str, torch.Tensor]) -> bool:
    """No NaN or inf in any floating-point tensor: the one divergence test of the strategy and the recorder."""
    return all(bool(torch.isfinite(tensor).all()) for tensor in weights.values() if tensor.is_floating_point())


def get_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the state dict, safe to keep after the model trains on."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
