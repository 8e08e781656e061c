"""The strategy/DP study of docs/experiments.md: every conf/*.toml x seeds, then fedcifar-compare.

    python benchmarks/study.py --dataset ../shared/data/cifar10 --out study            # the study
    python benchmarks/study.py --dataset synthetic --rounds 2 --seeds 1 --nodes 3 --out /tmp/s  # a smoke run

Each run is a real `flwr run .` of the default federation with one --run-config string: the
conf file's keys, plus dataset (made absolute: relative paths would resolve against flwr's
working directory), seed and output-dir (flwr 1.25 takes a TOML file or key=value pairs, not
both, so the file's keys are restated). A run is judged by its status.json, never by flwr's
exit code. The study's run folders go to OUT/runs, the comparison to OUT, and OUT/study.json
lists each run with its wall time (flwr start to exit) and status.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import tomli

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))  # run as a script from anywhere: the app beside this folder

from fedcifar_app import pyproject  # noqa: E402
from fedcifar_app.runs import compare  # noqa: E402

FLWR = Path(sys.executable).parent / "flwr"


def run_config_for(conf: Path, dataset: str, seed: int, output_dir: Path, rounds: int | None, nodes: int) -> dict:
    """The conf file's keys with this run's dataset, seed and output folder (and the smoke-run sizes)."""
    with conf.open("rb") as handle:
        values = pyproject.flatten_dict(tomli.load(handle))
    local = Path(dataset).expanduser()
    values["dataset"] = str(local.resolve()) if local.exists() else dataset
    values.update({"seed": seed, "output-dir": str(output_dir)})
    if rounds is not None:
        values["num-server-rounds"] = rounds
    if nodes != 10:  # the study's 10 nodes are pyproject's defaults; fewer need smaller minimums
        values.update({"min-train-nodes": nodes, "min-available-nodes": nodes, "min-evaluate-nodes": (nodes + 1) // 2})
    return values


def flwr_command(values: dict, nodes: int) -> list[str]:
    """The `flwr run .` command line of one run: its run config in one string, and fewer SuperNodes if asked."""
    command = [str(FLWR), "run", ".", "--run-config", pyproject.format_overrides(values)]
    if nodes != 10:
        command += ["--federation-config", pyproject.federation_override(PROJECT, {"num-supernodes": nodes})]
    return command


def run_one(values: dict, nodes: int, timeout: float) -> tuple[Path | None, float, str]:
    """One `flwr run .` in its own session (a killed CLI would leave Ray behind); returns folder, seconds, status."""
    output_dir = Path(values["output-dir"])
    output_dir.mkdir(parents=True, exist_ok=True)
    before = set(output_dir.iterdir())
    command = flwr_command(values, nodes)
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=PROJECT, start_new_session=True, stdout=subprocess.PIPE, text=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        output = f"timed out after {timeout:g}s"
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # flower-simulation and Ray leftovers
        except ProcessLookupError:
            pass
        process.wait()
    seconds = time.monotonic() - started
    new = sorted(set(output_dir.iterdir()) - before)
    if not new:
        return None, seconds, f"no run folder ({output.strip().splitlines()[-1:] or ['no output']})"
    status = json.loads((new[-1] / "status.json").read_text())
    return new[-1], seconds, status["status"] + (f": {status['reason']}" if status.get("reason") else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="../shared/data/cifar10", help="a local CIFAR-10 copy, or 'synthetic'")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--rounds", type=int, default=None, help="override num-server-rounds (default: the files')")
    parser.add_argument("--nodes", type=int, default=10, help="simulated SuperNodes (default: pyproject's 10)")
    parser.add_argument("--configs", type=Path, nargs="+", default=sorted((PROJECT / "conf").glob("*.toml")))
    parser.add_argument("--out", type=Path, default=Path("study"))
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed per run")
    args = parser.parse_args(argv)

    out = args.out.expanduser().resolve()
    runs, folders = [], []
    for conf in args.configs:
        for seed in args.seeds:
            values = run_config_for(conf, args.dataset, seed, out / "runs", args.rounds, args.nodes)
            folder, seconds, status = run_one(values, args.nodes, args.timeout)
            print(f"{conf.stem} seed {seed}: {status} in {seconds:.0f}s -> {folder}", flush=True)
            runs.append(
                {"config": conf.stem, "seed": seed, "folder": str(folder), "seconds": seconds, "status": status}
            )
            if folder is not None and status == "completed":
                folders.append(folder)
            (out / "study.json").write_text(json.dumps(runs, indent=2) + "\n")
    if not folders:
        print("no run completed; see study.json", file=sys.stderr)
        return 1
    code = compare.main([*map(str, folders), "--out", str(out)])
    return code or (1 if len(folders) < len(runs) else 0)


if __name__ == "__main__":
    sys.exit(main())
