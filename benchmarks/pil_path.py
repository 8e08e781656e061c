"""(2) the usual example data path for the same round's work: Hugging Face rows indexed one by
one, PIL decode, ToTensor, Normalize, DataLoader (what typical Flower examples do)."""

from __future__ import annotations

import random
import statistics
import time
from typing import Any

from common import Quiet, default_run_config, load_average, log
from floor import fedavg


def bench_pil(dataset: str, rounds: int, quiet: Quiet) -> dict[str, Any]:
    """quickstart-pytorch's data path: FederatedDataset, with_transform(ToTensor, Normalize), DataLoader."""
    quiet.wait("bench_pil")
    import torch
    from flwr_datasets import FederatedDataset
    from flwr_datasets.partitioner import IidPartitioner
    from torch.utils.data import DataLoader
    from torchvision.transforms import Compose, Normalize, ToTensor

    from fedcifar_app.model import Net, new_model

    config = default_run_config(dataset)
    transforms = Compose([ToTensor(), Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])

    def apply_transforms(batch: dict) -> dict:
        batch["img"] = [transforms(img) for img in batch["img"]]
        return batch

    started = time.perf_counter()
    fds = FederatedDataset(dataset=dataset, partitioners={"train": IidPartitioner(num_partitions=10)})
    test_loader = DataLoader(fds.load_split("test").with_transform(apply_transforms), batch_size=32)
    setup_s = time.perf_counter() - started

    def train(net, loader) -> None:
        optimizer = torch.optim.Adam(net.parameters(), lr=config.learning_rate)
        criterion = torch.nn.CrossEntropyLoss()
        net.train()
        for batch in loader:
            optimizer.zero_grad()
            criterion(net(batch["img"]), batch["label"]).backward()
            optimizer.step()

    @torch.no_grad()
    def test(net, loader) -> float:
        net.eval()
        correct = total = 0
        for batch in loader:
            correct += (net(batch["img"]).argmax(1) == batch["label"]).sum().item()
            total += len(batch["label"])
        return correct / total

    weights = new_model(0).state_dict()
    rows = []
    result: dict[str, Any] = {"load_before": load_average(), "setup_s": round(setup_s, 3)}
    for server_round in range(1, rounds + 1):
        started = time.perf_counter()
        updates, loaders = [], {}
        for pid in range(10):
            split = fds.load_partition(pid).train_test_split(test_size=config.val_fraction, seed=config.seed)
            split = split.with_transform(apply_transforms)
            loaders[pid] = DataLoader(split["test"], batch_size=32)
            local = Net()
            local.load_state_dict(weights)
            train(local, DataLoader(split["train"], batch_size=config.batch_size, shuffle=True))
            updates.append(({k: v.detach().clone() for k, v in local.state_dict().items()}, len(split["train"])))
        weights = fedavg(updates)
        trained = time.perf_counter()
        model = Net()
        model.load_state_dict(weights)
        for pid in random.Random(server_round).sample(range(10), 5):
            test(model, loaders[pid])
        accuracy = test(model, test_loader)
        ended = time.perf_counter()
        rows.append(
            {
                "round": server_round,
                "seconds": round(ended - started, 3),
                "train_s": round(trained - started, 3),
                "central_accuracy": round(accuracy, 4),
            }
        )
        log(f"PIL path round {server_round}: {rows[-1]['seconds']:.2f}s (train {rows[-1]['train_s']:.2f}s)")
    result.update(
        rounds=rows, round_s=round(statistics.median(r["seconds"] for r in rows), 3), load_after=load_average()
    )
    return result
