"""Deployment vs simulation: the same default 10-node run, timed per round, with CPU and memory.

    python benchmarks/deployment.py                       # 3 rounds on ../shared/data/cifar10
    python benchmarks/deployment.py --rounds 2 --nodes 10 --out /tmp/deployment.json

1. simulation: `flwr run . --stream` (the default federation, 10 SuperNodes in Ray);
2. local deployment: `fedcifar-deploy up --nodes N` on free ports, then
   `flwr run . local-deployment --stream`, then `fedcifar-deploy down`;
3. the per-message floor: CPU seconds one `flwr-clientapp` process pays to import Flower,
   torch and the ClientApp (a SuperNode starts one per message), times the messages of a round.

Round seconds come from each run folder's metrics.json. CPU: simulation polls its process
tree (Ray's processes live the whole run); the deployment's one-process-per-message children
are counted exactly through their parents' cutime/cstime (/proc/PID/stat), snapshotted before
and after the run. Memory: the peak of the summed RSS of the polled tree (shared pages count
once per process). `uptime` load goes with every number: the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATASET = (REPO.parent / "shared" / "data" / "cifar10").resolve()
BIN = Path(sys.executable).parent
POLL_S = 0.25
IDLE_WINDOW_S = 15.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
CLIENTAPP_IMPORTS = "import flwr.supernode.cli, fedcifar_app.client.app"  # what `flwr-clientapp` loads per message


def load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message} (load {load_average()})", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- /proc
def proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (index 0 = state)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def session_pids(sessions: set[int]) -> list[int]:
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = proc_stat(int(entry.name))
            if fields and int(fields[3]) in sessions:
                pids.append(int(entry.name))
    return pids


def rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def cpu_with_children_s(sessions: set[int]) -> float:
    """CPU of every live process in `sessions` plus what their reaped children used (cutime/cstime)."""
    total = 0
    for pid in session_pids(sessions):
        fields = proc_stat(pid)
        if fields:
            total += sum(int(fields[index]) for index in (11, 12, 13, 14))
    return total / CLK_TCK


class Monitor:
    """Polls the processes of some sessions: peak summed RSS, most processes, last-seen own CPU."""

    def __init__(self, sessions: set[int]):
        self.sessions = set(sessions)
        self.peak_rss_kb = 0
        self.peak_processes = 0
        self.peak_clientapps = 0
        self.own_ticks: dict[int, int] = {}

    def poll(self) -> None:
        pids = session_pids(self.sessions)
        for pid in pids:
            fields = proc_stat(pid)
            if fields:
                self.own_ticks[pid] = int(fields[11]) + int(fields[12])
        self.peak_rss_kb = max(self.peak_rss_kb, sum(rss_kb(pid) for pid in pids))
        self.peak_processes = max(self.peak_processes, len(pids))
        clientapps = sum(1 for pid in pids if b"flwr-clientapp" in _cmdline(pid))
        self.peak_clientapps = max(self.peak_clientapps, clientapps)

    @property
    def own_cpu_s(self) -> float:
        return sum(self.own_ticks.values()) / CLK_TCK

    def own_cpu_of(self, pid: int) -> float:
        return self.own_ticks.get(pid, 0) / CLK_TCK


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()[:300]
    except OSError:
        return b""


# --------------------------------------------------------------------------- runs
def free_port_block(count: int) -> list[int]:
    for base in range(31000, 60000, 97):
        try:
            for port in range(base, base + count):
                with socket.socket() as probe:
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        return list(range(base, base + count))
    raise RuntimeError(f"no {count} free ports")


def run_config(dataset: str, rounds: int, nodes: int, output_dir: Path) -> str:
    nodes_needed = f"min-train-nodes={nodes} min-available-nodes={nodes} min-evaluate-nodes={max(1, nodes // 2)}"
    return f"num-server-rounds={rounds} dataset='{dataset}' output-dir='{output_dir}' {nodes_needed}"


def rounds_written(output_dir: Path) -> int:
    """Rows in the run folder's metrics.json so far (written atomically)."""
    for metrics in output_dir.glob("*/metrics.json"):
        try:
            return len(json.loads(metrics.read_text()))
        except (OSError, ValueError):
            return 0
    return 0


def flwr_run(
    command: list[str], log_path: Path, output_dir: Path, timeout_s: float, extra_sessions: set[int]
) -> dict[str, Any]:
    """Run `flwr run` in its own session, polling it (and `extra_sessions`) until it ends.

    The CPU used so far is noted whenever metrics.json gains a round: CPU per round is less
    spoiled by other load on the machine than seconds per round.
    """
    started = time.monotonic()
    cpu_before = cpu_with_children_s(extra_sessions) if extra_sessions else 0.0
    with log_path.open("wb") as stream:
        process = subprocess.Popen(
            command, cwd=REPO, stdin=subprocess.DEVNULL, stdout=stream, stderr=subprocess.STDOUT, start_new_session=True
        )
    monitor = Monitor({process.pid, *extra_sessions})
    timed_out = False
    cpu_at_round: dict[int, float] = {}

    def cpu_so_far() -> float:
        if not extra_sessions:
            return monitor.own_cpu_s
        return cpu_with_children_s(extra_sessions) - cpu_before + monitor.own_cpu_of(process.pid)

    while process.poll() is None:
        monitor.poll()
        written = rounds_written(output_dir)
        if written and written - 1 not in cpu_at_round:
            cpu_at_round[written - 1] = round(cpu_so_far(), 1)
        if time.monotonic() - started > timeout_s:
            timed_out = True
            break
        time.sleep(POLL_S)
    _end_session(process)
    if extra_sessions:
        time.sleep(2.0)  # let the last flwr-clientapp processes exit and be reaped
    deployment_cpu = cpu_with_children_s(extra_sessions) - cpu_before if extra_sessions else 0.0
    return {
        "command": shlex.join(command),
        "log": str(log_path),
        "wall_s": round(time.monotonic() - started, 1),
        "timed_out": timed_out,
        # Simulation: every process of the run's session (Ray lives the whole run). Deployment: the
        # `flwr run` CLI's own, plus the SuperLink's and SuperNodes' sessions with reaped children.
        "cpu_s": round(deployment_cpu + monitor.own_cpu_of(process.pid) if extra_sessions else monitor.own_cpu_s, 1),
        "peak_rss_gb": round(monitor.peak_rss_kb / 2**20, 2),
        "peak_processes": monitor.peak_processes,
        "peak_clientapp_processes": monitor.peak_clientapps,
        "round_cpu_s": {
            r: round(cpu_at_round[r] - cpu_at_round[r - 1], 1) for r in cpu_at_round if r - 1 in cpu_at_round
        },
    }


def _end_session(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


def run_folder_summary(output_dir: Path) -> dict[str, Any]:
    folders = sorted(output_dir.glob("*/status.json"))
    if not folders:
        return {"status": "no run folder"}
    folder = folders[-1].parent
    status = json.loads((folder / "status.json").read_text())
    rows = json.loads((folder / "metrics.json").read_text()) if (folder / "metrics.json").exists() else []
    return {
        "status": status["status"],
        "reason": status.get("reason", ""),
        "run_folder": str(folder),
        "round_seconds": {int(row["round"]): row["seconds"] for row in rows},
        "central_accuracy": {int(row["round"]): row.get("central-accuracy") for row in rows},
    }


def bench_simulation(dataset: str, rounds: int, nodes: int, work: Path, timeout_s: float) -> dict[str, Any]:
    log("simulation: flwr run .")
    output = work / "simulation"
    command = [str(BIN / "flwr"), "run", ".", "--stream", "--run-config", run_config(dataset, rounds, nodes, output)]
    result = {"load_before": load_average(), **flwr_run(command, work / "simulation.log", output, timeout_s, set())}
    result.update(run_folder_summary(output), load_after=load_average())
    return result


def bench_deployment(
    dataset: str, rounds: int, nodes: int, work: Path, timeout_s: float, up_flags: list[str]
) -> dict[str, Any]:
    ports = free_port_block(3 + nodes)
    deploy_dir = work / "deploy"
    deploy = [sys.executable, "-m", "fedcifar_app.deploy"]
    up = [
        *deploy,
        "up",
        "--dir",
        str(deploy_dir),
        "--nodes",
        str(nodes),
        "--superlink-ports",
        ",".join(map(str, ports[:3])),
        "--clientappio-base-port",
        str(ports[3]),
        "--ready-timeout",
        "180",
        *up_flags,
    ]
    log(f"deployment: fedcifar-deploy up --nodes {nodes}")
    result: dict[str, Any] = {"up_command": shlex.join(up), "load_before": load_average()}
    started = time.monotonic()
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    try:
        answer = subprocess.run(up, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        result["up_s"] = round(time.monotonic() - started, 1)
        if answer.returncode != 0:
            result["status"] = f"up failed: {answer.stderr.strip()[-500:]}"
            return result
        state = json.loads((deploy_dir / "state.json").read_text())
        sessions = {record["pid"] for record in state["processes"]}
        idle_before = cpu_with_children_s(sessions)
        time.sleep(IDLE_WINDOW_S)  # what the waiting SuperLink and SuperNodes cost by themselves
        result["idle_cpu_per_s"] = round((cpu_with_children_s(sessions) - idle_before) / IDLE_WINDOW_S, 3)
        output = work / "deployment"
        log("deployment: flwr run . local-deployment")
        command = [
            str(BIN / "flwr"),
            "run",
            ".",
            "local-deployment",
            "--stream",
            "--federation-config",
            f"address='127.0.0.1:{ports[2]}'",
            "--run-config",
            run_config(dataset, rounds, nodes, output),
        ]
        result.update(flwr_run(command, work / "deployment.log", output, timeout_s, sessions))
        result.update(run_folder_summary(output), load_after=load_average())
    finally:
        subprocess.run([*deploy, "down", "--dir", str(deploy_dir)], cwd=REPO, env=env, capture_output=True, timeout=120)
    return result


def bench_clientapp_start(repeats: int = 3) -> dict[str, Any]:
    """CPU seconds and peak RSS of one process importing what `flwr-clientapp` imports per message."""
    log("floor: one flwr-clientapp process's imports")
    samples = []
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPROFILEIMPORTTIME"}
    for _ in range(repeats):
        process = subprocess.Popen([sys.executable, "-c", CLIENTAPP_IMPORTS], cwd=REPO, env=env)
        _, _, usage = os.wait4(process.pid, 0)
        samples.append((usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024))
    cpu = statistics.median(s[0] for s in samples)
    return {"cpu_s": round(cpu, 2), "max_rss_mb": round(max(s[1] for s in samples)), "load": load_average()}


def summarise(results: dict[str, Any], nodes: int, rounds: int) -> list[str]:
    sim, dep, floor = results["simulation"], results["deployment"], results["clientapp_start"]
    messages = nodes + max(1, nodes // 2)  # fraction-train 1.0, fraction-evaluate 0.5
    cores = len(os.sched_getaffinity(0))
    floor_round_s = messages * floor["cpu_s"] / cores
    lines = ["| | " + " | ".join(f"round {r}" for r in range(1, rounds + 1)) + " | wall | CPU | peak RSS | load |"]
    lines.append("|---" * (rounds + 5) + "|")
    for label, run in (("simulation `flwr run .`", sim), (f"deployment, {nodes} SuperNodes", dep)):
        seconds = run.get("round_seconds", {})
        cells = [f"{seconds[r]:.1f} s" if r in seconds else "-" for r in range(1, rounds + 1)]
        load = f"{run.get('load_before', ['?'])[0]} -> {run.get('load_after', ['?'])[0]}"
        lines.append(
            f"| {label} | " + " | ".join(cells) + f" | {run.get('wall_s', '-')} s | {run.get('cpu_s', '-')} s "
            f"| {run.get('peak_rss_gb', '-')} GB | {load} |"
        )
    ratios = [
        dep["round_seconds"][r] / sim["round_seconds"][r]
        for r in range(2, rounds + 1)
        if r in dep.get("round_seconds", {}) and r in sim.get("round_seconds", {})
    ]
    lines.append("")
    for label, run in (("simulation", sim), ("deployment", dep)):
        cpu = run.get("round_cpu_s", {})
        lines.append(f"{label} CPU-s per round: " + ", ".join(f"round {r}: {cpu[r]}" for r in sorted(cpu)))
    if ratios:
        lines.append(f"deployment / simulation, rounds 2..{rounds}: {', '.join(f'{x:.1f}x' for x in ratios)}")
    lines.append(
        f"per-message floor: {messages} messages x {floor['cpu_s']} CPU-s per flwr-clientapp start "
        f"/ {cores} cores = {floor_round_s:.1f} s of every deployment round ({floor['max_rss_mb']} MB RSS each)"
    )
    accuracy = [run.get("central_accuracy", {}).get(rounds) for run in (sim, dep)]
    lines.append(f"round-{rounds} central accuracy: simulation {accuracy[0]}, deployment {accuracy[1]}")
    lines.append(f"idle deployment (SuperLink + SuperNodes waiting): {dep.get('idle_cpu_per_s')} CPU-s per second")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default=str(DEFAULT_DATASET), help="dataset for both runs (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each run (default: %(default)s)")
    parser.add_argument("--nodes", type=int, default=10, help="SuperNodes of each run (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds each run may take (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "deployment.json", help="results JSON")
    parser.add_argument("--skip-simulation", action="store_true", help="reuse the simulation numbers in --out")
    parser.add_argument("--up-flag", action="append", default=[], help="extra `fedcifar-deploy up` flag (repeatable)")
    args = parser.parse_args(argv)
    if args.dataset != "synthetic" and not Path(args.dataset).is_dir():
        parser.error(f"--dataset {args.dataset} is not a folder; pass the CIFAR-10 parquet copy or 'synthetic'")

    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "cores": len(os.sched_getaffinity(0))}
    if args.skip_simulation and args.out.is_file():
        simulation = json.loads(args.out.read_text())["simulation"]
        for key in ("round_seconds", "central_accuracy", "round_cpu_s"):  # JSON made the round numbers strings
            simulation[key] = {int(k): v for k, v in simulation.get(key, {}).items()}
        results["simulation"] = simulation
    with tempfile.TemporaryDirectory(prefix="fedcifar-deploy-bench-") as tmp:
        work = Path(tmp)
        os.environ.setdefault("FEDCIFAR_CACHE_DIR", str(work / "cache"))
        results["clientapp_start"] = bench_clientapp_start()
        if "simulation" not in results:
            results["simulation"] = bench_simulation(args.dataset, args.rounds, args.nodes, work, args.timeout)
        results["deployment"] = bench_deployment(
            args.dataset,
            args.rounds,
            args.nodes,
            work,
            args.timeout,
            [f for flag in args.up_flag for f in flag.split()],
        )
        for run in ("simulation", "deployment"):  # keep the log tails: the folder goes away
            log_path = Path(results[run].get("log", "/nonexistent"))
            if log_path.is_file():
                results[run]["log_tail"] = log_path.read_text(errors="replace").splitlines()[-12:]
    results["table"] = summarise(results, args.nodes, args.rounds)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print("\n".join(results["table"]))
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
