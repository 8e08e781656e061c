"""Speed benchmark: the compute floor, the per-sample PIL data path, and the real `flwr run .`.

One command measures, in one invocation (see benchmarks/README.md for what each number means):

  data   the decode-once cache: cold decode of both splits, warm (memory-mapped) load, node partitions
  floor  (1) one round's training and evaluation work in this single plain PyTorch process on
         pre-decoded tensors (fedcifar_app.training + fedcifar_app.data): 10 IID clients train 1 local
         epoch each from the same global model, FedAvg, evaluation on half the clients' validation
         splits and on the central test split; several rounds, so the accuracy is checked too
  pil    (2) the same round's work on the usual example data path: Hugging Face rows indexed one by
         one, PIL decode, ToTensor, Normalize, DataLoader (what typical Flower examples do)
  flwr   (3) `flwr run .` with the default federation, with a cold cache and then a warm one:
         start-up to round 1, seconds per round, whole run, peak memory of the process tree, accuracy
  scale  (5) the same run with 1,000 virtual SuperNodes (--scale-nodes: more sizes) training 10 and
         evaluating 5 per round (fraction-train 10/N), plus the time to partition the train split N ways

    python benchmarks/benchmark.py                         # dataset: ../shared/data/cifar10
    python benchmarks/benchmark.py --dataset /path/to/cifar10 --out /tmp/results.json
    python benchmarks/benchmark.py --only floor flwr --federation-config "options.backend.client-resources.num-cpus=2"

Every `flwr run` starts in its own session (process group) and is ended as a whole on timeout.
Runs are judged by what they wrote (status.json, metrics.json), not by flwr's exit code.

Modules: common (machine, logging, quiet waits, the app's config), data_steps (0, 5's partitioning),
floor (1), pil_path (2), flwr_runs + processes (3, 5), report (ratios, goals, table), this file
(settings from the command line, the order of the steps).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import REPO, Quiet, federation_config, load_average, log, machine
from data_steps import bench_data, bench_partition_scale
from floor import add_floor_rounds
from flwr_runs import FlwrRunner
from pil_path import bench_pil
from report import brief, print_table, rewrite_report, summarise

DEFAULT_DATASET = (REPO.parent / "shared" / "data" / "cifar10").resolve()
DEFAULT_OUT = REPO / "benchmarks" / "results.json"
STEPS = ("data", "floor", "pil", "flwr", "scale")


@dataclass(frozen=True)
class Settings:
    """One invocation's settings, read from the command line once."""

    dataset: str  # absolute
    out: Path
    steps: tuple[str, ...]
    floor_rounds: int
    other_floor_rounds: int
    floor_threads: tuple[int, ...]
    pil_rounds: int
    rounds: int
    warm_runs: int
    federation_config: str | None
    scale_nodes: tuple[int, ...]
    timeout_s: float
    keep: bool
    quiet: Quiet
    app_dir: Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dataset",
        default=str(DEFAULT_DATASET) if DEFAULT_DATASET.exists() else None,
        help=f"CIFAR-10 folder (default {DEFAULT_DATASET} when it exists)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results (default benchmarks/results.json)")
    parser.add_argument("--only", nargs="+", choices=STEPS, default=list(STEPS), help="steps to run (default all)")
    parser.add_argument(
        "--floor-rounds",
        type=int,
        default=5,
        help="rounds of the first floor variant, from the initial model (default %(default)s: its accuracy is compared)",
    )
    parser.add_argument(
        "--other-floor-rounds", type=int, default=2, help="rounds of the other variants (default %(default)s)"
    )
    parser.add_argument(
        "--floor-threads",
        type=int,
        nargs="+",
        default=None,
        help="torch thread counts to run the floor with (default: 1, then torch's default); the faster is the floor",
    )
    parser.add_argument("--pil-rounds", type=int, default=1)
    parser.add_argument(
        "--rounds", type=int, default=5, help="num-server-rounds of the flwr runs (default %(default)s)"
    )
    parser.add_argument(
        "--warm-runs", type=int, default=2, help="warm-cache flwr runs; the best counts (default %(default)s)"
    )
    parser.add_argument("--federation-config", default=None, help="passed to every `flwr run` (e.g. num-cpus)")
    parser.add_argument(
        "--scale-nodes", type=int, nargs="+", default=[1000], help="step (5)'s federation sizes (default: 1000)"
    )
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per flwr run before it is ended")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, run folders, cache)")
    parser.add_argument(
        "--quiet-load",
        type=float,
        default=0.0,
        help="before each timed step wait until the 1-min load average is below this (0: don't)",
    )
    parser.add_argument("--quiet-wait", type=float, default=300, help="longest wait for quiet, seconds")
    parser.add_argument(
        "--app",
        type=Path,
        default=REPO,
        help="Flower app folder for the flwr runs (default: this checkout); e.g. a copy with another pyproject.toml",
    )
    parser.add_argument(
        "--report",
        type=Path,
        default=None,
        help="only re-summarise and print an existing results JSON (and rewrite its summary)",
    )
    return parser


def settings_from(args: argparse.Namespace, fail) -> Settings:
    """Check the arguments (``fail`` is the parser's error) and fill in the defaults that need torch."""
    if not args.dataset or not Path(args.dataset).is_dir():
        fail(f"--dataset: no such folder ({args.dataset}); pass the CIFAR-10 parquet folder")
    flwr_path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    if {"flwr", "scale"} & set(args.only) and shutil.which("flwr", path=flwr_path) is None:
        fail("`flwr` is not on PATH: activate the project's virtual environment")
    floor_threads = args.floor_threads
    if floor_threads is None:
        import torch

        floor_threads = sorted({torch.get_num_threads(), 1})  # 1 thread first: it has the 5 rounds
    return Settings(
        dataset=str(Path(args.dataset).resolve()),
        out=args.out,
        steps=tuple(args.only),
        floor_rounds=args.floor_rounds,
        other_floor_rounds=args.other_floor_rounds,
        floor_threads=tuple(floor_threads),
        pil_rounds=args.pil_rounds,
        rounds=args.rounds,
        warm_runs=args.warm_runs,
        federation_config=args.federation_config,
        scale_nodes=tuple(args.scale_nodes),
        timeout_s=args.timeout,
        keep=args.keep,
        quiet=Quiet(load=args.quiet_load, max_wait_s=args.quiet_wait),
        app_dir=args.app.resolve(),
    )


def main(argv: list[str] | None = None) -> int:
    cli = build_parser()
    args = cli.parse_args(argv)
    if args.report:
        rewrite_report(args.report)
        return 0
    settings = settings_from(args, cli.error)
    workdir = Path(tempfile.mkdtemp(prefix="fedcifar-bench-"))
    results = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "dataset": settings.dataset,
        "argv": sys.argv[1:],
        "machine": machine(),
        "federation_config": settings.federation_config,
        "workdir": str(workdir),
        "app": str(settings.app_dir),
        "rounds": settings.rounds,
        "scale_nodes": list(settings.scale_nodes),
    }
    log(f"working folder {workdir}; load average {load_average()}")
    try:
        run_steps(settings, results, workdir)
    finally:
        results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        results["summary"] = summarise(results)
        settings.out.parent.mkdir(parents=True, exist_ok=True)
        settings.out.write_text(json.dumps(results, indent=2) + "\n")
        if not settings.keep:
            for path in workdir.glob("cache-*"):
                shutil.rmtree(path, ignore_errors=True)
    print_table(results)
    log(f"results: {settings.out}; logs and run folders: {workdir}")
    return 0


def run_steps(settings: Settings, results: dict[str, Any], workdir: Path) -> None:
    """The steps asked for, in order, into ``results``; floor rounds are spread between the flwr runs."""
    steps, dataset = settings.steps, settings.dataset
    bench_cache = workdir / "cache-bench"  # the floor's and the data step's own cache
    if "data" in steps or "floor" in steps or "scale" in steps:
        results["data"] = bench_data(dataset, bench_cache, settings.quiet)
        log(f"data: {json.dumps(results['data'])}")

    def floor_pass(first_rounds: int, other_rounds: int) -> None:
        if "floor" in steps:
            add_floor_rounds(
                results,
                dataset,
                bench_cache,
                settings.floor_threads,
                settings.quiet,
                first_rounds=first_rounds,
                other_rounds=other_rounds,
            )

    floor_pass(settings.floor_rounds, settings.other_floor_rounds)
    if "pil" in steps:
        if "floor" in results:  # the same torch threads as the floor it is compared with
            import torch

            torch.set_num_threads(results["floor"]["torch_threads"])
        results["pil"] = bench_pil(dataset, settings.pil_rounds, settings.quiet)
    runner = FlwrRunner(settings.app_dir, workdir, settings.timeout_s, settings.quiet)
    run_config = {"dataset": repr(dataset), "num-server-rounds": str(settings.rounds)}
    if "flwr" in steps:
        run_cold_and_warm(settings, runner, run_config, results, floor_pass)
    if "scale" in steps:
        partitionings = results["scale_partitioning"] = []
        runs = results["flwr_scale_runs"] = []
        for nodes in settings.scale_nodes:
            partitionings.append(bench_partition_scale(dataset, bench_cache, nodes))
            log(f"partitioning: {partitionings[-1]}")
            # 10 nodes train and 5 evaluate per round, as in the 10-node federation: fractions scale with 1/nodes.
            scale_config = {
                **run_config,
                "fraction-train": f"{10 / nodes:g}",
                "fraction-evaluate": f"{5 / nodes:g}",
                "min-train-nodes": "10",
                "min-evaluate-nodes": "5",
                "min-available-nodes": str(nodes),
            }
            federation = federation_config(settings.app_dir, settings.federation_config, **{"num-supernodes": nodes})
            runs.append({"nodes": nodes, **runner.run(f"flwr_scale_{nodes}", bench_cache, scale_config, federation)})
            log(f"flwr scale {nodes}: {brief(runs[-1])}")


def run_cold_and_warm(settings: Settings, runner: FlwrRunner, run_config: dict, results: dict, floor_pass) -> None:
    """(3): one run with a fresh cache (it decodes), then warm runs that find it; the best warm one counts."""
    flwr_cache = runner.workdir / "cache-flwr"
    federation = federation_config(settings.app_dir, settings.federation_config) if settings.federation_config else None
    results["flwr_cold"] = runner.run("flwr_cold", flwr_cache, run_config, federation)
    log(f"flwr cold: {brief(results['flwr_cold'])}")
    floor_pass(1, 1)  # the machine is shared: floor rounds between the runs follow its load
    warm_runs = results["flwr_warm_runs"] = []
    for index in range(1, settings.warm_runs + 1):
        warm_runs.append(runner.run(f"flwr_warm_{index}", flwr_cache, run_config, federation))
        log(f"flwr warm {index}: {brief(warm_runs[-1])}")
        floor_pass(1, 1)
    completed = [r for r in warm_runs if r.get("status") == "completed"] or warm_runs
    results["flwr_warm"] = min(completed, key=lambda r: r.get("wall_s") or 1e9)


if __name__ == "__main__":
    sys.exit(main())
