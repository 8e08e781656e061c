"""Interleaved A/B of `flwr run .` start-up: two or more app folders (e.g. a worktree of an older commit and
this checkout) take turns, so that the machine's drift hits every variant alike.

    git worktree add /tmp/before <commit>
    python benchmarks/startup_ab.py --dataset ../shared/data/cifar10 --repeats 3 before=/tmp/before after=.
    python benchmarks/startup_ab.py --cold ... # a fresh decode cache for every run

Each run is the benchmark's FlwrRunner (its own session, judged by what it wrote); one line per run with
start-up (command to round 0's row), when the ServerApp started, when the data check was done, the run
to status `completed` and to the command's exit, and the CPU seconds of the process tree by round 0.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common import Quiet
from flwr_runs import FlwrRunner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="+", help="NAME=APP_FOLDER")
    parser.add_argument("--dataset", default=str(Path(__file__).resolve().parents[2] / "shared/data/cifar10"))
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cold", action="store_true", help="a fresh decode cache for every run")
    args = parser.parse_args()
    variants = dict(v.split("=", 1) for v in args.variants)
    work = Path(tempfile.mkdtemp(prefix="fedcifar-ab-"))
    config = {"dataset": repr(str(Path(args.dataset).resolve())), "num-server-rounds": str(args.rounds)}
    for repeat in range(args.repeats):
        for name, app in variants.items():
            cache = work / (f"cache-{name}-{repeat}" if args.cold else "cache")
            run = FlwrRunner(Path(app).resolve(), work, 900, Quiet(0, 0)).run(f"{name}-{repeat}", cache, config, None)
            steps = run.get("startup_breakdown", {})
            row = {
                "variant": name,
                "status": run.get("status"),
                "startup_s": run.get("startup_to_round1_s"),
                "server_app_started_s": steps.get("server_app_started"),
                "data_check_done_s": steps.get("data_check_done"),
                "completed_s": run.get("run_to_completed_s"),
                "exit_s": run.get("wall_s"),
                "cpu_by_round0_s": run.get("startup_cpu_s"),
            }
            print(json.dumps(row), flush=True)
    print(f"logs and run folders: {work}")


if __name__ == "__main__":
    main()
