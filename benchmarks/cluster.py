"""The same `flwr run .` three ways on this machine: a Ray of its own per run, attached to a persistent
one-machine Ray, and on the head of a three-host Ray cluster (docs/simulation-cluster.md).

    plain     `flwr run .`              local-simulation: starts (and ends) a Ray of its own
    attached  `flwr run . ray-cluster`  on a persistent `ray start --head --num-cpus=2`
    cluster   `flwr run . ray-cluster`  on the head of head + two workers (the head 0 CPUs, each worker
                                        1), so two ClientApps train at once, as in the other two

Every "host" is a network namespace with its own /tmp, /dev/shm and home (tests/support/ray_cluster.py,
the end-to-end test's hosts), so no Ray started here is found by any other `flwr run` on the machine;
the plain and attached runs share one host (and its decode cache). One untimed warm-up run per host
fills the caches, then the variants run interleaved, `--repeats` times each. Per run: start-up
(command start to round 0's row in metrics.json, i.e. when round 1 starts), each round's seconds
(metrics.json), the whole run (command start to exit). `--short N` adds N interleaved pairs of a
short run (synthetic data, 1 round) plain vs attached: what a persistent Ray saves per run of a sweep.

    sudo-less root only (namespaces): flock -x /work/.heavy.lock python benchmarks/cluster.py \\
        --dataset ../shared/data/cifar10 --out benchmarks/cluster.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import REPO, load_average, log, machine

sys.path.insert(0, str(REPO / "tests"))  # the end-to-end test's namespace hosts
from support.netns import netns_unavailable  # noqa: E402
from support.ray_cluster import HEAD_PORT, RayHosts  # noqa: E402

OUT = "/tmp/bench-out"  # on each host: its own /tmp
RAY_MEMORY = ("--object-store-memory=200000000",)


class Bench:
    def __init__(self, root: Path, timeout_s: float) -> None:
        self.hosts = RayHosts(root / "hosts")
        self.timeout_s = timeout_s
        self.solo = self.hosts.add("solo", 4)
        self.head = self.hosts.add("head", 1)
        self.workers = {name: self.hosts.add(name, number) for number, name in ((2, "w1"), (3, "w2"))}

    def start_ray(self) -> dict[str, float]:
        """The persistent one-machine Ray, then the cluster, as docs/simulation-cluster.md starts them."""
        took = {}
        started = time.time()
        self.hosts.ray_start(
            "solo", ["ray", "start", "--head", f"--node-ip-address={self.solo}", "--port=6379", "--num-cpus=2"]
        )
        took["ray start --head (one machine)"] = round(time.time() - started, 2)
        started = time.time()
        self.hosts.ray_start(
            "head", ["ray", "start", "--head", f"--node-ip-address={self.head}", f"--port={HEAD_PORT}", "--num-cpus=0"]
        )
        for name, address in self.workers.items():
            self.hosts.ray_start(
                name,
                ["ray", "start", f"--address={self.head}:{HEAD_PORT}", f"--node-ip-address={address}", "--num-cpus=1"],
            )
        self.hosts.wait_for(nodes=3, cpus=2.0)
        took["ray start: head + 2 workers, joined"] = round(time.time() - started, 2)
        return took

    def run(self, label: str, host: str, federation: list[str], run_config: str) -> dict[str, Any]:
        """One `flwr run` on ``host``; timings from what it wrote."""
        out = f"{OUT}/{label}"
        outside = self.hosts.outside(host, out)
        log_path = self.hosts.root / f"{label}.log"
        command = ["flwr", "run", ".", *federation, "--run-config", f"{run_config} output-dir='{out}'"]
        log(f"{label} on {host}: {' '.join(command)}")
        seen: dict[int, float] = {}
        load_before = load_average()
        started = time.time()
        with log_path.open("wb") as stream:
            process = self.hosts.popen(host, command, stdout=stream, stderr=subprocess.STDOUT)
        while process.poll() is None and time.time() - started < self.timeout_s:
            for row in rows(outside):
                seen.setdefault(row["round"], time.time())
            time.sleep(0.1)
        timed_out = process.poll() is None
        if timed_out:
            process.kill()
        process.wait()
        exited = time.time()
        final = rows(outside)
        status = read_status(outside)
        return {
            "label": label,
            "host": host,
            "status": "timed out" if timed_out else status,
            "startup_s": round(seen[0] - started, 2) if 0 in seen else None,
            "round_s": {str(row["round"]): row.get("seconds") for row in final if row["round"] > 0},
            "run_s": round(exited - started, 2),
            "load_1m": [load_before[0], load_average()[0]],
            "log": str(log_path),
        }

    def close(self) -> None:
        self.hosts.close()


def rows(outside: Path) -> list[dict[str, Any]]:
    try:
        return json.loads(next(outside.glob("*/metrics.json")).read_text())
    except (StopIteration, OSError, ValueError):
        return []


def read_status(outside: Path) -> str:
    try:
        return json.loads(next(outside.glob("*/status.json")).read_text())["status"]
    except (StopIteration, OSError, ValueError, KeyError):
        return "no status"


VARIANTS = {  # name -> (host, federation words)
    "plain": ("solo", []),
    "attached": ("solo", ["ray-cluster"]),
    "cluster": ("head", ["ray-cluster"]),
}


def median(values: list[float | None]) -> float | None:
    known = [value for value in values if value is not None]
    return round(statistics.median(known), 2) if known else None


def summarise(runs: list[dict[str, Any]], variants: list[str], prefix: str = "") -> dict[str, dict[str, Any]]:
    summary = {}
    for variant in variants:
        mine = [run for run in runs if run["label"].startswith(f"{prefix}{variant}-")]
        summary[variant] = {
            "runs": len(mine),
            "completed": sum(run["status"] == "completed" for run in mine),
            "startup_s": median([run["startup_s"] for run in mine]),
            "round_1_s": median([run["round_s"].get("1") for run in mine]),
            "round_2_s": median([run["round_s"].get("2") for run in mine]),
            "run_s": median([run["run_s"] for run in mine]),
            "startup_range": [min(run["startup_s"] or 0 for run in mine), max(run["startup_s"] or 0 for run in mine)],
            "round_2_range": [
                min(run["round_s"].get("2") or 0 for run in mine),
                max(run["round_s"].get("2") or 0 for run in mine),
            ],
            "run_range": [min(run["run_s"] for run in mine), max(run["run_s"] for run in mine)],
        }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--dataset", default=str(REPO.parent / "shared" / "data" / "cifar10"))
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each variant (interleaved)")
    parser.add_argument("--short", type=int, default=3, help="pairs of short runs, plain vs attached")
    parser.add_argument("--timeout", type=float, default=300, help="seconds one run may take")
    parser.add_argument("--out", type=Path, default=None, help="write every number here (JSON)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/fedcifar-cluster-bench"))
    args = parser.parse_args()
    reason = netns_unavailable()
    if reason:
        sys.exit(f"cluster.py: {reason}")
    dataset = Path(args.dataset).resolve()
    subprocess.run(["rm", "-rf", str(args.workdir)], check=True)
    args.workdir.mkdir(parents=True)
    bench = Bench(args.workdir, args.timeout)
    results: dict[str, Any] = {"machine": machine(), "dataset": str(dataset), "started": time.strftime("%F %T")}
    try:
        results["ray_start_s"] = bench.start_ray()
        default = f"num-server-rounds=2 dataset='{dataset}'"
        warm = [bench.run(f"warm-{name}", *VARIANTS[name], default) for name in ("plain", "cluster")]
        runs = []
        for repeat in range(args.repeats):
            for name, (host, federation) in VARIANTS.items():
                runs.append(bench.run(f"{name}-{repeat}", host, federation, default))
        short = []
        for repeat in range(args.short):
            for name in ("plain", "attached"):
                short.append(
                    bench.run(f"short-{name}-{repeat}", *VARIANTS[name], "num-server-rounds=1 dataset='synthetic'")
                )
        results.update(warm_up=warm, runs=runs, short_runs=short)
        results["summary"] = summarise(runs, list(VARIANTS))
        results["short_summary"] = summarise(short, ["plain", "attached"], prefix="short-")
        plain, cluster = results["summary"]["plain"], results["summary"]["cluster"]
        if plain["round_2_s"] and cluster["round_2_s"]:
            results["cluster_round_2_ratio"] = round(cluster["round_2_s"] / plain["round_2_s"], 2)
    finally:
        bench.close()
        results["finished"] = time.strftime("%F %T")
    text = json.dumps(results, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(
        json.dumps(
            {key: results.get(key) for key in ("ray_start_s", "summary", "short_summary", "cluster_round_2_ratio")},
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
