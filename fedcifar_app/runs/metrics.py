"""One round's numbers: the names clients report, the row the run folder keeps, how it prints.

Every metric name lives here once. Clients reply with ``TRAIN_LOSS`` / ``EVAL_*`` and
``NUM_EXAMPLES`` (FedAvg weights by it); the server adds the central evaluation; a
``RoundRow`` is what metrics.json, the checkpoint, the plots and comparisons read. Older
run folders lack newer keys: ``RoundRow.from_json`` reads them as missing (None).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# Reply keys (kebab-case, as Flower's records and the run config use).
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
EVAL_LOSS = "eval-loss"
EVAL_ACCURACY = "eval-accuracy"
CENTRAL_LOSS = "central-loss"
CENTRAL_ACCURACY = "central-accuracy"
EPSILON = "epsilon"  # privacy spent so far (dp runs); the server's accountant, not a client metric


def number(values: Mapping[str, Any], key: str) -> float:
    """``values[key]`` as a number: Flower's records type their values as numbers or lists of them."""
    value = values[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{key}={value!r} is not a number")
    return value


def scalars(values: Mapping[str, Any]) -> dict[str, float]:
    """The numbers among ``values`` (a Flower record may also hold lists)."""
    return {
        key: value for key, value in values.items() if isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def _finite_or_none(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class RoundRow:
    """One row of metrics.json. ``round`` 0 is the initial model (central evaluation only)."""

    round: int
    central_accuracy: float | None = None
    central_loss: float | None = None
    eval_accuracy: float | None = None
    eval_loss: float | None = None
    train_loss: float | None = None
    seconds: float | None = None
    epsilon: float | None = None  # dp runs only; rows of older folders read it as None

    @classmethod
    def field_keys(cls) -> tuple[str, ...]:
        """metrics.json keys, in column order."""
        return tuple(f.name.replace("_", "-") for f in dataclasses.fields(cls))

    def to_json(self) -> dict[str, Any]:
        """Kebab-case keys; a non-finite number is stored as null so metrics.json stays strict JSON."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            out[field.name.replace("_", "-")] = value if field.name == "round" else _finite_or_none(value)
        return out

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> RoundRow:
        """Read a row written by any version of this app: unknown keys ignored, missing ones None."""
        values: dict[str, Any] = {"round": int(raw["round"])}
        for field in dataclasses.fields(cls)[1:]:
            values[field.name] = _finite_or_none(raw.get(field.name.replace("_", "-")))
        return cls(**values)

    def get(self, key: str) -> float | None:
        """The value of a metrics.json key (``"central-accuracy"``), None when absent."""
        return getattr(self, key.replace("-", "_"), None)


def rows_to_json(rows: Iterable[RoundRow]) -> list[dict[str, Any]]:
    return [row.to_json() for row in rows]


def _cell(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_row(row: RoundRow) -> str:
    """One line per round: what a person watching the run wants to see."""
    return (
        f"round {row.round:>3}  central-acc {_cell(row.central_accuracy, '.4f')}  "
        f"central-loss {_cell(row.central_loss, '.4f')}  eval-acc {_cell(row.eval_accuracy, '.4f')}  "
        f"train-loss {_cell(row.train_loss, '.4f')}  {_cell(row.seconds, '6.1f')}s"
    )


SUMMARY_COLUMNS = (
    (CENTRAL_ACCURACY, "central-acc"),
    (CENTRAL_LOSS, "central-loss"),
    (EVAL_ACCURACY, "eval-acc"),
    (EVAL_LOSS, "eval-loss"),
    (TRAIN_LOSS, "train-loss"),
)


def summary_table(rows: Iterable[RoundRow]) -> str:
    """The per-round table printed at the end of a run."""
    header_cells = [f"{'round':>5}", *(f"{title:>12}" for _, title in SUMMARY_COLUMNS), f"{'seconds':>7}"]
    header = " | ".join(header_cells)
    lines = [header, "-" * len(header)]
    for row in rows:
        cells = [f"{row.round:>5}", *(f"{_cell(row.get(key), '.4f'):>12}" for key, _ in SUMMARY_COLUMNS)]
        cells.append(f"{_cell(row.seconds, '.1f'):>7}")
        lines.append(" | ".join(cells))
    return "\n".join(lines)
