"""Ratios against the floor, the goals, and the results table (also pasted into benchmarks/README.md)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Goals:
    """What the app promises (benchmarks/README.md says why each)."""

    steady_round_vs_floor: float = 1.1
    whole_run_vs_5_floors_warm: float = 1.3
    whole_run_vs_5_floors_cold: float = 1.4
    startup_warm_s: float = 6.0
    peak_memory_gb: float = 3.0
    final_central_accuracy: float = 0.41
    scale_round_vs_10_nodes: float = 1.5
    scale_startup_s: float = 12.0  # 1,000 nodes


GOALS = Goals()


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    """Ratios and goals. The floor is the plain one: one process with torch's default threads, the
    median of its rounds (3 or more); each variant's best round is kept beside it. flwr figures use
    the best warm run."""
    variants = results.get("floor_variants", {})
    floor_variant = max(variants.values(), key=lambda v: v["torch_threads"], default={})
    floor = floor_variant.get("round_s")
    rounds = results.get("rounds", 5)
    one_thread_cpu = variants.get("threads=1", {}).get("round_cpu_s")
    summary: dict[str, Any] = {
        "floor_round_s": floor,
        "floor_torch_threads": floor_variant.get("torch_threads"),
        "floor_round_best_s": floor_variant.get("round_min_s"),
        "floor_rounds_measured": floor_variant.get("rounds_measured"),
        "one_thread_floor_round_cpu_s": one_thread_cpu,
    }
    if "pil" in results:
        summary["pil_round_s"] = results["pil"]["round_s"]
        summary["pil_vs_floor"] = ratio(results["pil"]["round_s"], floor)
    runs = {"flwr_cold": results.get("flwr_cold")}
    for run in scale_runs(results):
        runs[f"flwr_scale_{run.get('nodes', results.get('scale_nodes'))}"] = run
    for index, run in enumerate(results.get("flwr_warm_runs", []), 1):
        runs[f"flwr_warm_{index}"] = run
    for label, run in runs.items():
        if not run or not run.get("steady_round_s"):
            continue
        summary[label] = {
            "steady_round_s": run["steady_round_s"],
            "steady_vs_floor": ratio(run["steady_round_s"], floor),
            # Load-robust: CPU seconds per round of the whole tree vs one 1-thread process doing the same work.
            "steady_cpu_vs_1_thread_floor_cpu": ratio(run.get("steady_round_cpu_s"), one_thread_cpu),
            "run_to_completed_s": run["run_to_completed_s"],
            "run_to_exit_s": run["wall_s"],
            "run_to_exit_vs_n_floors": ratio(run["wall_s"], rounds * floor if floor else None),
            "startup_s": run["startup_to_round1_s"],
        }
    warm = results.get("flwr_warm") or {}
    cold = results.get("flwr_cold") or {}
    warm_runs = [r for r in results.get("flwr_warm_runs", []) if r.get("status") == "completed"]
    goals = {}
    if warm.get("steady_round_s") and floor:
        goals[f"steady rounds (3-5) <= 1.1 x floor: {ratio(warm['steady_round_s'], floor):.2f}"] = (
            ratio(warm["steady_round_s"], floor) <= GOALS.steady_round_vs_floor
        )
        goals[
            f"whole run (command start to exit) <= {GOALS.whole_run_vs_5_floors_warm} x (5 x floor), warm: "
            f"{ratio(warm['wall_s'], rounds * floor):.2f}"
        ] = ratio(warm["wall_s"], rounds * floor) <= GOALS.whole_run_vs_5_floors_warm
        best_startup = min(r["startup_to_round1_s"] for r in warm_runs)
        goals[f"start-up to round 1 <= 6 s, warm (best {best_startup:.1f} s)"] = best_startup <= GOALS.startup_warm_s
        goals[f"round-5 central accuracy >= 0.41: {warm.get('final_central_accuracy')}"] = (
            warm.get("final_central_accuracy") or 0
        ) >= GOALS.final_central_accuracy
    if cold.get("run_to_completed_s") and floor:
        goals[
            f"whole run (command start to exit) <= {GOALS.whole_run_vs_5_floors_cold} x (5 x floor), cold: "
            f"{ratio(cold['wall_s'], rounds * floor):.2f}"
        ] = ratio(cold["wall_s"], rounds * floor) <= GOALS.whole_run_vs_5_floors_cold
    measured = [r for r in [cold, *warm_runs] if r.get("peak_rss_gb")]
    if measured:
        pss, rss = max(r["peak_pss_gb"] for r in measured), max(r["peak_rss_gb"] for r in measured)
        summary["peak_pss_gb"], summary["peak_rss_gb"] = pss, rss
        goals[f"peak memory <= 3 GB, summed PSS (shared pages once): {pss:.2f}"] = pss <= GOALS.peak_memory_gb
        goals[f"peak memory <= 3 GB, summed RSS (shared pages per process): {rss:.2f}"] = rss <= GOALS.peak_memory_gb
    for scale in scale_runs(results):
        nodes = scale.get("nodes", results.get("scale_nodes", 1000))
        if scale.get("steady_round_s") and warm.get("steady_round_s"):
            vs_10 = summary[f"scale_{nodes}_vs_10_nodes"] = ratio(scale["steady_round_s"], warm["steady_round_s"])
            goals[f"{nodes:,} nodes: round <= 1.5 x 10-node round: {vs_10:.2f}"] = (
                vs_10 <= GOALS.scale_round_vs_10_nodes
            )
        if nodes == 1000 and scale.get("startup_to_round1_s"):
            startup = scale["startup_to_round1_s"]
            goals[f"1,000 nodes: start-up <= 12 s: {startup:.1f}"] = startup <= GOALS.scale_startup_s
    summary["goals_met"] = goals
    return summary


def scale_runs(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Step (5)'s runs, one per node count (results files before 2026-11-29 hold one, as flwr_scale)."""
    if "flwr_scale_runs" in results:
        return results["flwr_scale_runs"]
    return [results["flwr_scale"]] if results.get("flwr_scale") else []


def table_lines(results: dict[str, Any]) -> list[str]:
    """The results table (also pasted into benchmarks/README.md)."""
    s = results["summary"]
    floor = s.get("floor_round_s")
    rounds = results.get("rounds", 5)

    def fmt(v: Any, spec: str = ".2f") -> str:
        return "-" if v is None else format(v, spec)

    lines = []
    m = results["machine"]
    lines.append(
        f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB RAM, torch {m['torch']}, "
        f"flwr {m['flwr']}, Python {m['python']}"
    )
    if "data" in results:
        d = results["data"]
        lines.append(
            f"data: cold decode train {d['cold_decode_train_s']:.2f}s ({d['decode_images_per_s']:,} img/s, "
            f"{d['cold_decode_train_cpu_s']:.2f} CPU-s), test {d['cold_decode_test_s']:.2f}s, warm load "
            f"{d['warm_load_train_s'] * 1000:.1f} ms, 10 node partitions {d['ten_node_partitions_s']:.2f}s"
        )
    header = (
        f"| {'':44s} | {'s/round':>14s} | {'x floor':>7s} | {'CPU s/round':>11s} | {'start-up s':>10s} | "
        f"{'run s: done/exit':>16s} | {f'x {rounds} floors':>10s} | {'peak GB RSS / PSS':>17s} | {'acc':>6s} | {'load 1m':>12s} |"
    )
    lines += [header, "|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|"]
    for variant in (v for _, v in sorted(results.get("floor_variants", {}).items())):
        chosen = " = floor" if variant.get("torch_threads") == s.get("floor_torch_threads") else ""
        name = f"(1) 1 process, {variant['torch_threads']} thread(s), {variant['rounds_measured']} rounds{chosen}"
        best, median = variant["round_min_s"], variant["round_s"]
        lines.append(
            f"| {name:44s} | {best:6.2f} ({median:5.2f}) | {fmt(ratio(median, floor)):>7s} | "
            f"{variant['round_cpu_s']:11.2f} | {'':>10s} | {f'{rounds} x {median:.2f}':>16s} | "
            f"{fmt(ratio(median, floor)):>10s} | {'':>17s} | "
            f"{fmt(variant['final_central_accuracy'] if variant['accuracy_after_rounds'] >= 5 else None, '.4f'):>6s} | "
            f"{_loads(variant)} |"
        )
    if "pil" in results:
        p = results["pil"]
        lines.append(
            f"| {'(2) per-sample PIL data path':44s} | {p['round_s']:14.2f} | {fmt(s.get('pil_vs_floor')):>7s} | "
            f"{'':>11s} | {'':>10s} | {'':>16s} | {'':>10s} | {'':>17s} | {'':>6s} | {_loads(p)} |"
        )
    rows = [("(3) flwr run ., cold cache", results.get("flwr_cold"))]
    for index, run in enumerate(results.get("flwr_warm_runs", []), 1):
        best = " (best)" if run is results.get("flwr_warm") and len(results["flwr_warm_runs"]) > 1 else ""
        rows.append((f"(3) flwr run ., warm cache, run {index}{best}", run))
    for run in scale_runs(results):
        nodes = run.get("nodes", results.get("scale_nodes", 1000))
        rows.append((f"(5) {nodes:,} nodes, fraction-train {10 / nodes:g}, warm", run))
    for name, r in rows:
        if not r:
            continue
        if r.get("status") != "completed":
            lines.append(f"| {name:44s} | FAILED: {r.get('status')} {r.get('reason', '')} |")
            continue
        lines.append(
            f"| {name:44s} | {fmt(r['steady_round_s']):>14s} | {fmt(ratio(r['steady_round_s'], floor)):>7s} | "
            f"{fmt(r.get('steady_round_cpu_s')):>11s} | {fmt(r['startup_to_round1_s']):>10s} | "
            f"{fmt(r['run_to_completed_s'], '.1f'):>7s} / {fmt(r['wall_s'], '.1f'):>6s} | {fmt(ratio(r['wall_s'], rounds * floor if floor else None)):>10s} | "
            f"{r['peak_rss_gb']:7.2f} / {r['peak_pss_gb']:<7.2f} | {fmt(r['final_central_accuracy'], '.4f'):>6s} | {_loads(r)} |"
        )
    partitionings = results.get("scale_partitioning") or ([results["scale"]] if "scale" in results else [])
    for sc in partitionings:
        lines.append(
            f"partitioning {sc['num_partitions']:,} ways (one process): partitioner + first node "
            f"{sc['partitioner_and_first_node_s']:.2f}s, all {sc['num_partitions']:,} nodes {sc['all_nodes_s']:.2f}s"
        )
    lines.append(
        "s/round: (1) best round (median in brackets; the floor is the default-threads median); flwr = mean of "
        "rounds 3-5 (metrics.json 'seconds'). "
        "CPU s/round: user+system seconds of all the run's processes (floor: its process, median round). "
        "run s: command start to status 'completed' / to the command's exit (Ray shut down); "
        "x N floors (N = rounds) uses the exit. acc: central test accuracy after the last round."
    )
    for goal, met in s.get("goals_met", {}).items():
        lines.append(f"  {'MET   ' if met else 'MISSED'}  {goal}")
    return lines


def _loads(step: dict[str, Any]) -> str:
    before, after = step.get("load_before"), step.get("load_after")
    return f"{before[0]:4.1f} -> {after[0]:4.1f}" if before and after else " " * 12


def print_table(results: dict[str, Any]) -> None:
    print("\n" + "\n".join(table_lines(results)) + "\n")


# --------------------------------------------------------------------------- main


def rewrite_report(path: Path) -> None:
    """--report: re-summarise an existing results JSON, rewrite its summary, print the table."""
    results = json.loads(path.read_text())
    results["summary"] = summarise(results)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)


def brief(run: dict[str, Any]) -> str:
    keys = (
        "status",
        "startup_to_round1_s",
        "steady_round_s",
        "run_to_completed_s",
        "wall_s",
        "peak_rss_gb",
        "peak_pss_gb",
        "final_central_accuracy",
        "startup_breakdown",
        "round_seconds",
    )
    return json.dumps({k: run.get(k) for k in keys})
