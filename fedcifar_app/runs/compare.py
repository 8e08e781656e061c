"""fedcifar-compare: several run folders side by side, as one plot and a Markdown table.

    fedcifar-compare outputs/20260101-120000 outputs/20260101-130000 [--out DIR]

writes DIR/comparison.png (central accuracy and loss per round of every run) and
DIR/comparison.md (final and best accuracy, round of the best, wall time, epsilon of DP runs),
and prints the table. Runs are labelled by the run-config keys whose values differ between
them; runs that differ only in ``seed`` form a group, summarised as mean and spread. Folders
of every format are read (``folder.read_rows``; keys newer than a folder read as their defaults).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..errors import ConfigError
from ..files import atomic_write_text, write_problem
from .folder import CONFIG, METRICS, read_rows
from .metrics import RoundRow
from .status import read_status

COMPARISON_PNG = "comparison.png"
COMPARISON_MD = "comparison.md"
# Keys that say where or how a run was started, not what it computed: never labels.
NOT_LABELS = ("output-dir", "resume-from", "verbose", "device", "node-wait-timeout", "round-timeout")
GROUP_ACROSS = "seed"


@dataclass(frozen=True)
class RunSummary:
    folder: Path
    config: dict[str, Any]
    rows: list[RoundRow]
    status: str = "-"  # read_status's state: a "running" whose process died reads "interrupted"

    @property
    def accuracies(self) -> list[tuple[int, float]]:
        return [(row.round, row.central_accuracy) for row in self.rows if row.central_accuracy is not None]

    @property
    def final_accuracy(self) -> float | None:
        return self.accuracies[-1][1] if self.accuracies else None

    @property
    def best(self) -> tuple[int, float] | None:
        return max(self.accuracies, key=lambda pair: pair[1]) if self.accuracies else None

    @property
    def wall_seconds(self) -> float:
        """Seconds of all recorded rounds (round 0 includes the start-up: data check, initial evaluation)."""
        return sum(row.seconds or 0.0 for row in self.rows)

    @property
    def epsilon(self) -> float | None:
        return next((row.epsilon for row in reversed(self.rows) if row.epsilon is not None), None)


def load_run(folder: Path) -> RunSummary:
    """A run folder's config and rows; anything else is a one-line ConfigError naming the folder and the fix."""
    folder = Path(folder)
    if not (folder / METRICS).is_file() or not (folder / CONFIG).is_file():
        missing = METRICS if not (folder / METRICS).is_file() else CONFIG
        raise ConfigError(
            f"{folder} is not a run folder (no {missing}): pass folders that a run wrote under output-dir, "
            "e.g. outputs/20260101-120000"
        )
    try:
        config = json.loads((folder / CONFIG).read_text())
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except ValueError as err:
        raise ConfigError(f"{folder / CONFIG} cannot be read ({err}): the folder is damaged; leave it out") from None
    except OSError as err:
        raise ConfigError(
            f"{folder / CONFIG} cannot be read ({err.strerror}): make it readable or leave it out"
        ) from None
    try:
        rows = read_rows(folder)
    except ConfigError as err:
        raise ConfigError(f"{err}; leave {folder} out of the comparison") from None
    if not any(row.central_accuracy is not None for row in rows):
        raise ConfigError(f"{folder} has no recorded rounds yet: compare it once round 0 is in {METRICS}")
    try:
        status = read_status(folder).state
    except (ValueError, OSError):  # a damaged or unreadable status.json does not stop a comparison of the metrics
        status = "unknown"
    defaults = RunConfig().to_run_config()
    return RunSummary(folder, {**defaults, **config}, rows, status)


def differing_keys(runs: Sequence[RunSummary]) -> list[str]:
    """Keys whose values differ between the runs: strategy first, then in the run config's order."""
    order = ["strategy", *RunConfig().to_run_config()]
    keys = {key for run in runs for key in run.config} - set(NOT_LABELS)
    ordered = sorted(keys, key=lambda key: (order.index(key) if key in order else len(order), key))
    return [key for key in ordered if len({json.dumps(run.config.get(key)) for run in runs}) > 1]


def label(run: RunSummary, keys: Sequence[str]) -> str:
    """The differing keys where this run is not at the default (strategy always), e.g. "strategy=fedprox proximal-mu=0.1"."""
    defaults = RunConfig().to_run_config()
    shown = [key for key in keys if key == "strategy" or run.config.get(key) != defaults.get(key)]
    return " ".join(f"{key}={run.config.get(key)}" for key in shown) or "defaults"


def _number(value: float | None, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def runs_table(runs: Sequence[RunSummary], keys: Sequence[str]) -> str:
    lines = [
        "| run | folder | status | final accuracy | best accuracy | round of best | wall time (s) | epsilon |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        best = run.best
        lines.append(
            f"| {label(run, keys)} | {run.folder.name} | {run.status} | {_number(run.final_accuracy)} | "
            f"{_number(best[1] if best else None)} | {best[0] if best else '-'} | {run.wall_seconds:.1f} | "
            f"{_number(run.epsilon, '.2f')} |"
        )
    return "\n".join(lines)


def _mean_spread(values: Sequence[float]) -> str:
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {spread:.4f}"


def grouped_table(groups: dict[str, list[RunSummary]]) -> str:
    lines = [
        f"| config (over {GROUP_ACROSS}s) | runs | final accuracy | best accuracy | wall time (s) | epsilon |",
        "|---|---|---|---|---|---|",
    ]
    for name, members in groups.items():
        finals = [run.final_accuracy for run in members if run.final_accuracy is not None]
        bests = [run.best[1] for run in members if run.best is not None]
        epsilons = [run.epsilon for run in members if run.epsilon is not None]
        lines.append(
            f"| {name} | {len(members)} | {_mean_spread(finals)} | {_mean_spread(bests)} | "
            f"{statistics.mean(run.wall_seconds for run in members):.1f} | "
            f"{_number(statistics.mean(epsilons) if epsilons else None, '.2f')} |"
        )
    return "\n".join(lines)


def compare(folders: Sequence[Path], out: Path) -> str:
    """Write comparison.png and comparison.md into ``out``; return the Markdown."""
    from .plots import write_comparison  # matplotlib only once the inputs are known to be good

    runs = [load_run(Path(folder)) for folder in folders]
    keys = differing_keys(runs)
    group_keys = [key for key in keys if key != GROUP_ACROSS]

    def group_of(run: RunSummary) -> str:
        return label(run, group_keys) if group_keys else "all runs"

    groups: dict[str, list[RunSummary]] = {}
    for run in runs:
        groups.setdefault(group_of(run), []).append(run)
    markdown = (
        f"# Comparison of {len(runs)} runs\n\nLabels: the run-config keys that differ between the runs "
        f"({', '.join(keys) or 'none'}), each where not at its default.\n\n"
        f"Central accuracy on the test set. Plot: {COMPARISON_PNG}.\n\n{runs_table(runs, keys)}\n"
    )
    if any(len(members) > 1 for members in groups.values()):
        markdown += f"\nMean ± standard deviation over {GROUP_ACROSS}s:\n\n{grouped_table(groups)}\n"
    curves = []
    for run in runs:
        name = group_of(run)
        members = len(groups[name])
        curves.append(
            (f"{name} ({members} runs)" if members > 1 else label(run, keys), list(groups).index(name), run.rows)
        )
    writing = out
    try:
        out.mkdir(parents=True, exist_ok=True)
        writing = out / COMPARISON_PNG
        write_comparison(writing, curves)
        writing = out / COMPARISON_MD
        atomic_write_text(writing, markdown)
    except OSError as err:  # a full or read-only disk: one line, and no half-written file is left
        what, fix = write_problem(err)
        raise ConfigError(f"cannot write {writing}: {what}; {fix}, or pass another --out") from None
    return markdown


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedcifar-compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, metavar="RUN_FOLDER", help="run folders to compare")
    parser.add_argument("--out", type=Path, default=Path("."), help="where comparison.png/.md go (default: here)")
    args = parser.parse_args(argv)
    try:
        markdown = compare(args.folders, args.out.expanduser().resolve())
    except ConfigError as err:
        print(f"fedcifar-compare: error: {err}", file=sys.stderr)
        return 2
    print(markdown)
    print(f"Wrote {args.out / COMPARISON_PNG} and {args.out / COMPARISON_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
