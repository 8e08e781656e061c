"""``fedcifar-centralized``: the tutorial's Step 1, the centralized baseline. Flower-free.

Trains the same CNN on ONE partition (by default partition 0 of 10, what one federated
client holds) for a few epochs, with the same data code, the same training loops and the
same run config (``[tool.flwr.app.config]`` in pyproject.toml, validated by
``RunConfig``), and prints the validation loss and accuracy after each epoch and the test
accuracy at the end. It answers "what does one client reach on its own?", the number
federated training has to beat.

    fedcifar-centralized --run-config "dataset='/path/to/cifar10'" --epochs 5

Like the Flower tutorial, each epoch is one call of the training loop (a fresh Adam per
epoch, as each federated round gets), followed by a validation pass.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .config import NodeData, RunConfig
from .errors import ConfigError, UsageError
from .pyproject import app_run_config, parse_overrides

PROG = "fedcifar-centralized"


@dataclass(frozen=True)
class EpochResult:
    epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    seconds: float


@dataclass(frozen=True)
class CentralizedResult:
    epochs: list[EpochResult]
    test_loss: float
    test_accuracy: float
    num_train: int
    num_val: int
    num_test: int


def build_config(app: Path, overrides_text: str) -> RunConfig:
    """pyproject's run config, the command line's overrides on top, validated as `flwr run` would."""
    values = app_run_config(app)
    values.update(parse_overrides(overrides_text))
    return RunConfig.from_run_config(values)


def run_centralized(
    config: RunConfig,
    *,
    partition_id: int,
    num_partitions: int,
    epochs: int,
    report: Callable[[str], None] = print,
    progress: bool | None = None,
) -> CentralizedResult:
    """Train on one partition, validate after each epoch, test at the end; ``report`` gets the lines."""
    # Heavy imports here, so argument errors answer at once.
    from tqdm import tqdm

    from . import training
    from .data import load_node_data, load_split
    from .model import new_model
    from .seeds import derive_seed

    device = training.pick_device(config.device)
    node = NodeData(partition_id=partition_id, num_partitions=num_partitions)
    data = load_node_data(config, node)
    test_data = load_split(config.dataset, "test")
    report(
        f"Centralized baseline on {node.label} of {config.dataset}: {len(data.train)} training / "
        f"{len(data.val)} validation images, {len(test_data)} test images | device {device} | "
        f"batch-size {config.batch_size}, learning-rate {config.learning_rate:g}, {epochs} epoch(s), seed {config.seed}"
    )
    # The federated run's initial model (same seed derivation), so the two start from the same weights.
    model = new_model(derive_seed(config.seed, "init"))
    batches = math.ceil(len(data.train) / config.batch_size)
    results = []
    for epoch in range(1, epochs + 1):
        started = time.monotonic()
        with tqdm(
            total=batches,
            desc=f"epoch {epoch}/{epochs}",
            unit="batch",
            leave=False,
            disable=None if progress is None else not progress,
        ) as bar:
            train_loss = training.train(
                model,
                data.train,
                epochs=1,
                batch_size=config.batch_size,
                learning_rate=config.learning_rate,
                device=device,
                seed=derive_seed(config.seed, "centralized", partition_id, epoch),
                on_batch=lambda: bar.update(1),
            )
        val = training.evaluate(model, data.val, device)
        result = EpochResult(epoch, train_loss, val.loss, val.accuracy, time.monotonic() - started)
        results.append(result)
        report(
            f"epoch {epoch}/{epochs}  train-loss {train_loss:.4f}  validation loss {val.loss:.4f}  "
            f"accuracy {val.accuracy:.4f}  ({result.seconds:.1f}s)"
        )
    test = training.evaluate(model, test_data, device)
    report(f"Final test set performance: loss {test.loss:.4f}, accuracy {test.accuracy:.4f}")
    return CentralizedResult(results, test.loss, test.accuracy, len(data.train), len(data.val), len(test_data))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="The centralized baseline: train the app's CNN on one partition, as one client would alone.",
        epilog=(
            "Settings come from [tool.flwr.app.config] in <app>/pyproject.toml, overridden by --run-config, "
            "e.g. --run-config \"dataset='/path/to/cifar10' batch-size=64\"."
        ),
    )
    parser.add_argument(
        "--app", default=".", help="the Flower app folder whose pyproject.toml to read (default: %(default)s)"
    )
    parser.add_argument(
        "--run-config",
        default="",
        metavar="'K=V ...'",
        help="run-config overrides, the syntax of `flwr run --run-config`",
    )
    parser.add_argument(
        "--partition-id", type=int, default=0, help="which partition to train on (default: %(default)s)"
    )
    parser.add_argument(
        "--num-partitions",
        type=int,
        default=10,
        help="how many partitions the training split is divided into (default: %(default)s)",
    )
    parser.add_argument("--epochs", type=int, default=5, help="training epochs (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: one error line and exit status 2 for a bad setting, no traceback."""
    from .errors import DataError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.num_partitions < 1:
            raise UsageError(f"--num-partitions {args.num_partitions}: use an integer >= 1")
        if not 0 <= args.partition_id < args.num_partitions:
            raise UsageError(
                f"--partition-id {args.partition_id}: use an integer in 0..{args.num_partitions - 1} "
                f"(--num-partitions is {args.num_partitions})"
            )
        if args.epochs < 1:
            raise UsageError(f"--epochs {args.epochs}: use an integer >= 1")
        config = build_config(Path(args.app), args.run_config)
        run_centralized(
            config,
            partition_id=args.partition_id,
            num_partitions=args.num_partitions,
            epochs=args.epochs,
            progress=False if args.no_progress else None,
        )
    except (UsageError, ConfigError, DataError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
