"""What one node does with one message, Flower-free: its validated config, its data, the device, the
received model; then train, evaluate or describe.

It imports torch and the ML code, so ``client.app`` imports it on a node's first message rather than
when Flower loads the ClientApp: flower-simulation loads the ClientApp in its main thread just before
``ray.init``, and a torch import there held Ray back by ~1.5 s (benchmarks/README.md, start-up).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .. import training
from ..config import NodeData, RunConfig
from ..data import NodeSplits, load_node_data
from ..model import Net
from ..seeds import derive_seed
from .threads import size_torch_threads


@dataclass(frozen=True)
class NodeJob:
    """Everything one handler needs: validated config, this node's data, a model with the global weights."""

    config: RunConfig
    node: NodeData
    data: NodeSplits
    device: torch.device
    model: Net

    @classmethod
    def build(
        cls,
        run_config: Mapping[str, Any],
        node_config: Mapping[str, Any],
        weights: Mapping[str, torch.Tensor] | None,
    ) -> NodeJob:
        config = RunConfig.from_run_config(run_config)
        node = NodeData.from_node_config(node_config)
        size_torch_threads(node_config)  # this process's share of the cores (threads.py)
        data = load_node_data(config, node)
        device = training.pick_device(config.device)
        model = Net()
        if weights is not None:
            model.load_state_dict(weights)
        return cls(config, node, data, device, model)

    def train(
        self, server_round: int, *, epochs: int, batch_size: int, learning_rate: float, proximal_mu: float
    ) -> tuple[dict[str, torch.Tensor], float]:
        """Train on this node's training split; returns the new weights and the mean training loss."""
        loss = training.train(
            self.model,
            self.data.train,
            epochs=epochs,
            batch_size=batch_size,
            learning_rate=learning_rate,
            device=self.device,
            # Seeded by (seed, round, node) so any process running this node repeats it exactly.
            seed=derive_seed(self.config.seed, "train", server_round, self.node.label),
            proximal_mu=proximal_mu,
        )
        return training.get_weights(self.model), loss

    def evaluate(self) -> training.EvalResult:
        """The received model on this node's validation split."""
        return training.evaluate(self.model, self.data.val, self.device)

    def describe(self) -> dict[str, Any]:
        """What the data check reports: split sizes, torch threads, where the data comes from, device."""
        return {
            "num-train": len(self.data.train),
            "num-val": len(self.data.val),
            "torch-threads": torch.get_num_threads(),
            "data": self.node.label,
            "device": str(self.device),
        }
