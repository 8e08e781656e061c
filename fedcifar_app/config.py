"""The run config: one typed, validated object built from ``context.run_config``.

Every key in ``[tool.flwr.app.config]`` is read and checked here, once, so the apps,
the centralized baseline and the benchmark agree on names, types and ranges, and a
bad value stops the run with one line before any data is loaded or any training starts.

``python -m fedcifar_app.config --run-config "..."`` checks an override string (or TOML file) before
it is submitted: a key that is not in pyproject.toml never reaches this module under `flwr run`,
Flower refuses it first, with a traceback (docs/troubleshooting.md).
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .strategy_table import FLOWER_DEFAULT, STRATEGIES, StrategySpec, strategy_keys


class Partitioner(str, enum.Enum):
    """How the shared training split is divided among nodes."""

    IID = "iid"
    DIRICHLET = "dirichlet"


class DeviceChoice(str, enum.Enum):
    """Where the model trains; AUTO picks CUDA when the process can see a GPU."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


class DpMode(str, enum.Enum):
    """Differential privacy: OFF, CENTRAL (the server clips) or CLIENT (each client clips); the server adds noise."""

    OFF = "off"
    CENTRAL = "central"
    CLIENT = "client"


SYNTHETIC_DATASET = "synthetic"
DP_KEYS = ("dp-noise-multiplier", "dp-clipping-norm", "dp-delta")
# Keys whose change would make a resumed run a different experiment: a resume must pass the same values.
RESUME_MUST_MATCH = ("dataset", "partitioner", "dirichlet-alpha", "seed", "val-fraction", "strategy", "dp")


@dataclass(frozen=True)
class RunConfig:
    """The validated run config. Field names are the kebab-case keys in snake_case."""

    num_server_rounds: int = 5
    fraction_train: float = 1.0
    fraction_evaluate: float = 0.5
    min_train_nodes: int = 10
    min_evaluate_nodes: int = 5
    min_available_nodes: int = 10
    local_epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 0.001
    dataset: str = "uoft-cs/cifar10"
    partitioner: Partitioner = Partitioner.IID
    dirichlet_alpha: float = 0.5
    val_fraction: float = 0.2
    seed: int = 42
    output_dir: str = "outputs"
    resume_from: str = ""
    device: DeviceChoice = DeviceChoice.AUTO
    node_wait_timeout: float = 120.0
    round_timeout: float = 600.0
    verbose: bool = False
    strategy: str = "fedavg"  # a name in strategy_table.STRATEGIES
    proximal_mu: float = 0.0
    server_learning_rate: float = FLOWER_DEFAULT
    server_momentum: float = 0.0
    trim_beta: float = 0.2
    num_malicious_nodes: int = 0
    dp: DpMode = DpMode.OFF
    dp_noise_multiplier: float = 1.0
    dp_clipping_norm: float = 1.0
    dp_delta: float = 1e-5

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """Build and validate from Flower's run config (kebab-case keys)."""
        known = {f.name.replace("_", "-"): f for f in dataclasses.fields(cls)}
        unknown = sorted(set(run_config) - set(known))
        if unknown:
            named = ", ".join(f"{key}{_did_you_mean(key, known)}" for key in unknown)
            raise ConfigError(f"unknown run-config key(s) {named}: allowed keys are {', '.join(sorted(known))}")
        values = {}
        for key, value in run_config.items():
            values[known[key].name] = _coerce(key, value, known[key].type)
        config = cls(**values)
        config.validate()
        return config

    def to_run_config(self) -> dict[str, Any]:
        """The kebab-case dict that ``from_run_config`` reads back (for config.json)."""
        out = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            out[field.name.replace("_", "-")] = value.value if isinstance(value, enum.Enum) else value
        return out

    def validate(self) -> None:
        """Range checks; each failure names the key, the value and what is allowed."""
        _check(self.num_server_rounds >= 1, "num-server-rounds", self.num_server_rounds, "an integer >= 1")
        for key, value in (("fraction-train", self.fraction_train), ("fraction-evaluate", self.fraction_evaluate)):
            _check(0.0 < value <= 1.0, key, value, "a number in (0, 1]")
        for key, value in (
            ("min-train-nodes", self.min_train_nodes),
            ("min-evaluate-nodes", self.min_evaluate_nodes),
            ("min-available-nodes", self.min_available_nodes),
        ):
            _check(value >= 1, key, value, "an integer >= 1")
        _check(
            self.min_available_nodes >= max(self.min_train_nodes, self.min_evaluate_nodes),
            "min-available-nodes",
            self.min_available_nodes,
            f"at least min-train-nodes ({self.min_train_nodes}) and min-evaluate-nodes "
            f"({self.min_evaluate_nodes}), since Flower waits for that many nodes before sampling",
        )
        _check(self.local_epochs >= 1, "local-epochs", self.local_epochs, "an integer >= 1")
        _check(self.batch_size >= 1, "batch-size", self.batch_size, "an integer >= 1")
        _check(
            self.learning_rate > 0 and math.isfinite(self.learning_rate),
            "learning-rate",
            self.learning_rate,
            "a finite number > 0",
        )
        _check(bool(self.dataset.strip()), "dataset", self.dataset, "a hub id, a local folder or 'synthetic'")
        _check(
            self.dirichlet_alpha > 0 and math.isfinite(self.dirichlet_alpha),
            "dirichlet-alpha",
            self.dirichlet_alpha,
            "a finite number > 0",
        )
        _check(0.0 < self.val_fraction < 1.0, "val-fraction", self.val_fraction, "a number in (0, 1)")
        _check(self.seed >= 0, "seed", self.seed, "an integer >= 0")
        _check(bool(self.output_dir.strip()), "output-dir", self.output_dir, "a folder path")
        _check(self.node_wait_timeout > 0, "node-wait-timeout", self.node_wait_timeout, "seconds > 0")
        _check(self.round_timeout > 0, "round-timeout", self.round_timeout, "seconds > 0")
        self.validate_strategy()

    def validate_strategy(self) -> None:
        """Strategy and DP keys: ranges, and no key set that the chosen strategy or dp mode would ignore."""
        _check(self.strategy in STRATEGIES, "strategy", self.strategy, f"one of {', '.join(map(repr, STRATEGIES))}")
        _check(
            self.proximal_mu >= 0 and math.isfinite(self.proximal_mu), "proximal-mu", self.proximal_mu, "a number >= 0"
        )
        _check(
            self.server_learning_rate >= 0 and math.isfinite(self.server_learning_rate),
            "server-learning-rate",
            self.server_learning_rate,
            "a number > 0, or 0 for the strategy's own default",
        )
        _check(0.0 <= self.server_momentum < 1.0, "server-momentum", self.server_momentum, "a number in [0, 1)")
        _check(0.0 < self.trim_beta < 0.5, "trim-beta", self.trim_beta, "a number in (0, 0.5)")
        _check(self.num_malicious_nodes >= 0, "num-malicious-nodes", self.num_malicious_nodes, "an integer >= 0")
        _check(
            self.dp_noise_multiplier > 0 and math.isfinite(self.dp_noise_multiplier),
            "dp-noise-multiplier",
            self.dp_noise_multiplier,
            "a number > 0 (no noise is no privacy: use dp='off')",
        )
        _check(
            self.dp_clipping_norm > 0 and math.isfinite(self.dp_clipping_norm),
            "dp-clipping-norm",
            self.dp_clipping_norm,
            "a number > 0",
        )
        _check(0.0 < self.dp_delta < 1.0, "dp-delta", self.dp_delta, "a number in (0, 1)")
        current, defaults = self.to_run_config(), RunConfig().to_run_config()
        for key, readers in strategy_keys().items():
            if key not in self.strategy_spec.arguments and current[key] != defaults[key]:
                raise ConfigError(
                    f"run-config {key}={current[key]!r} has no effect with strategy={self.strategy!r}: "
                    f"it is read by strategy {' / '.join(map(repr, readers))}; remove the key or pick one of those"
                )
        if self.dp is DpMode.OFF:
            for key in DP_KEYS:
                if current[key] != defaults[key]:
                    raise ConfigError(
                        f"run-config {key}={current[key]!r} has no effect with dp='off': "
                        "set dp='central' or dp='client', or remove the key"
                    )

    @property
    def strategy_spec(self) -> StrategySpec:
        """The chosen strategy's entry in the strategy table."""
        return STRATEGIES[self.strategy]


@dataclass(frozen=True)
class NodeData:
    """What one node trains on: a partition of the shared dataset or its own folder."""

    partition_id: int | None = None
    num_partitions: int | None = None
    data_path: str | None = None

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> NodeData:
        """Read ``partition-id``/``num-partitions`` or ``data-path`` from the node config."""
        usage = (
            'start the SuperNode with --node-config "partition-id=0 num-partitions=10" '
            "(a share of the run's dataset) or --node-config \"data-path='/path/to/data'\" (its own data)"
        )
        data_path = node_config.get("data-path")
        if data_path is not None:
            if not isinstance(data_path, str) or not data_path.strip():
                raise ConfigError(f"node config data-path={data_path!r} is not a folder path: {usage}")
            return cls(data_path=data_path)
        if "partition-id" not in node_config or "num-partitions" not in node_config:
            given = ", ".join(f"{k}={v!r}" for k, v in node_config.items()) or "nothing"
            raise ConfigError(
                f"node config has {given} but needs partition-id and num-partitions, or data-path: {usage}"
            )
        partition_id = node_config["partition-id"]
        num_partitions = node_config["num-partitions"]
        if not (isinstance(num_partitions, int) and num_partitions >= 1):
            raise ConfigError(f"node config num-partitions={num_partitions!r} must be an integer >= 1: {usage}")
        if not (isinstance(partition_id, int) and 0 <= partition_id < num_partitions):
            raise ConfigError(
                f"node config partition-id={partition_id!r} must be an integer in 0..{num_partitions - 1}: {usage}"
            )
        return cls(partition_id=partition_id, num_partitions=num_partitions)

    @property
    def partition(self) -> tuple[int, int]:
        """(partition-id, num-partitions) of a node that trains on a share of the run's dataset."""
        if self.partition_id is None or self.num_partitions is None:
            raise ValueError(f"{self.label} is not a partition of the run's dataset")
        return self.partition_id, self.num_partitions

    @property
    def label(self) -> str:
        """How logs name this node's data."""
        if self.data_path is not None:
            return f"data-path={self.data_path}"
        return f"partition {self.partition_id}/{self.num_partitions}"


def _did_you_mean(key: str, known: Iterable[str]) -> str:
    """ " (did you mean learning-rate?)" for a near miss such as learning_rate or learning-rte; else ""."""
    close = difflib.get_close_matches(key.replace("_", "-").lower(), list(known), n=1, cutoff=0.65)
    return f" (did you mean {close[0]}?)" if close else ""


def absolute_path(text: str) -> Path:
    """A run-config path as the run uses it: ``~`` expanded, a relative path resolved against this
    process's working directory (where `flwr run` was typed in simulation, where the SuperLink was
    started in deployment), so logs and records name it in full."""
    return Path(text).expanduser().resolve()


def output_dir_of(run_config: Mapping[str, Any]) -> Path:
    """``output-dir`` of a run config not validated yet: the ServerApp creates the run folder first, so
    even a config it then refuses is recorded in a folder of its own."""
    return absolute_path(str(run_config.get("output-dir", RunConfig.output_dir)))


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"run-config {key}={value!r} is not allowed: use {allowed}")


def _coerce(key: str, value: Any, type_name: Any) -> Any:
    """Convert a TOML/CLI value to the field's type, or say what was expected."""
    type_name = type_name if isinstance(type_name, str) else getattr(type_name, "__name__", str(type_name))
    if type_name == "bool":
        if isinstance(value, bool):
            return value
        raise ConfigError(f"run-config {key}={value!r} is not allowed: use true or false")
    if type_name == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"run-config {key}={value!r} is not allowed: use an integer")
        return value
    if type_name == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"run-config {key}={value!r} is not allowed: use a number")
        return float(value)
    if type_name == "str":
        if not isinstance(value, str):
            raise ConfigError(f"run-config {key}={value!r} is not allowed: use a quoted string, e.g. {key}='...'")
        return value
    for enum_type in (Partitioner, DeviceChoice, DpMode):
        if type_name == enum_type.__name__:
            allowed = ", ".join(repr(m.value) for m in enum_type)
            try:
                return enum_type(value)
            except ValueError:
                raise ConfigError(f"run-config {key}={value!r} is not allowed: use one of {allowed}") from None
    raise TypeError(f"no coercion for field type {type_name}")  # programming error, not user input


def main(argv: Sequence[str] | None = None) -> int:
    """Check a `flwr run --run-config` value (the text or a TOML file) against the app's pyproject.toml:
    its keys and every value, without loading data or starting Flower. Exit 0 when a run would start."""
    import argparse
    import sys

    from .errors import UsageError
    from .pyproject import app_run_config, parse_overrides

    prog = "python -m fedcifar_app.config"
    parser = argparse.ArgumentParser(prog=prog, description=main.__doc__)
    parser.add_argument("--app", default=".", help="the app folder whose pyproject.toml to read (default: .)")
    parser.add_argument("--run-config", default="", metavar="'K=V ...' | FILE.toml", help="what `flwr run` would get")
    args = parser.parse_args(argv)
    try:
        overrides = parse_overrides(args.run_config)
        RunConfig.from_run_config({**app_run_config(Path(args.app)), **overrides})
    except (UsageError, ConfigError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    changed = " ".join(f"{key}={value!r}" for key, value in overrides.items()) or "none"
    print(f"run config OK (overrides: {changed})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
