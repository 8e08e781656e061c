"""Deployment vs simulation, cold and warm ClientApp starts side by side: one invocation, three runs.

    python benchmarks/deployment.py                       # 3 rounds on ../shared/data/cifar10
    python benchmarks/deployment.py --rounds 2 --nodes 10 --out /tmp/deployment.json

1. simulation: `flwr run . --stream` (the default federation, 10 SuperNodes in Ray);
2. deployment, cold: `fedcifar-deploy up --nodes N --cold` (Flower's own start: a fresh `flwr-clientapp`
   process per message) on free ports, `flwr run . local-deployment --stream`, `fedcifar-deploy down`;
3. deployment, warm: the same with `up`'s default, the warm ClientApp start (docs/deployment.md);
4. one process start, cold and warm: `flwr-clientapp --help` (imports Flower's ClientApp runtime and
   torch, exits), started by hand and through a warm parent.

Per round: seconds from each run folder's metrics.json; CPU-s of every process of the run, with the
children they reaped (/proc/PID/stat cutime/cstime), noted whenever metrics.json gains a round. Per
message, each ClientApp process in pid order (the data check's N queries, then per round N train and
N/2 evaluate messages): cold, the `flwr-clientapp` process (CPU read once it has exited and before
SuperExec reaps it; peak RSS = its VmHWM); warm, the forked child (CPU-s and peak RSS from the warm
parent's wait4, its log line per ClientApp) plus its shim. RSS counts every page a process maps, also
the ones it shares with the warm parent; PSS splits shared pages among the processes that share them,
so summed PSS is what the machine holds. Memory of a whole run: the peak of each sum over its
processes. `uptime` load goes with every number: the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATASET = (REPO.parent / "shared" / "data" / "cifar10").resolve()
BIN = Path(sys.executable).parent
POLL_S = 0.25
PSS_EVERY = 4  # polls: reading smaps_rollup walks page tables, so once a second
IDLE_WINDOW_S = 15.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
CLIENTAPP_IMPORTS = "import flwr.supernode.cli, fedcifar_app.client.app"  # what `flwr-clientapp` loads per message
WARM_CHILD_LINE = re.compile(r"ClientApp pid (\d+) ended \(exit code (-?\d+)\) after ([\d.]+) CPU-s, peak RSS (\d+) MB")
STARTS = ("simulation", "deployment_cold", "deployment_warm")
LABELS = {
    "simulation": "simulation `flwr run .`",
    "deployment_cold": "deployment, cold start (`up --cold`)",
    "deployment_warm": "deployment, warm start (`up`)",
}


def load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message} (load {load_average()})", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- /proc
def proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (index 0 = state, 1 = parent pid)."""
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


def status_kb(pid: int, key: str) -> int:
    """A kB field of /proc/PID/status (VmRSS, VmHWM); 0 when gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def pss_kb(pid: int) -> int:
    """Proportional set size: private pages plus each shared page divided by its sharers."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
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


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()[:400]
    except OSError:
        return b""


@dataclass
class ClientAppProcess:
    """One ClientApp process (cold `flwr-clientapp`, a warm shim, or a warm child) as polling saw it."""

    pid: int
    kind: str  # "process" (cold flwr-clientapp or warm shim) or "child" (forked by the warm parent)
    cpu_ticks: int = 0
    exited: bool = False  # seen as a zombie: cpu_ticks is its final CPU
    hwm_kb: int = 0
    pss_kb: int = 0


@dataclass
class Monitor:
    """Polls the processes of some sessions: peak summed RSS and PSS, last-seen CPU, ClientApp processes."""

    sessions: set[int]
    warm_parents: set[int] = field(default_factory=set)
    peak_rss_kb: int = 0
    peak_pss_kb: int = 0
    polls: int = 0
    own_ticks: dict[int, int] = field(default_factory=dict)
    clientapps: dict[int, ClientAppProcess] = field(default_factory=dict)

    def poll(self) -> None:
        self.polls += 1
        with_pss = self.polls % PSS_EVERY == 1
        pids = session_pids(self.sessions)
        rss = pss = 0
        for pid in pids:
            fields = proc_stat(pid)
            if not fields:
                continue
            ticks = int(fields[11]) + int(fields[12])
            self.own_ticks[pid] = ticks
            rss += status_kb(pid, "VmRSS")
            pid_pss = pss_kb(pid) if with_pss else 0
            pss += pid_pss
            seen = self.clientapps.get(pid)  # a zombie's cmdline is empty: known pids stay known
            if seen is None:
                if int(fields[1]) in self.warm_parents:
                    seen = self.clientapps[pid] = ClientAppProcess(pid, "child")
                elif b"flwr-clientapp" in _cmdline(pid):
                    seen = self.clientapps[pid] = ClientAppProcess(pid, "process")
                else:
                    continue
            seen.cpu_ticks = max(seen.cpu_ticks, ticks)
            seen.exited = seen.exited or fields[0] == "Z"
            seen.hwm_kb = max(seen.hwm_kb, status_kb(pid, "VmHWM"))
            seen.pss_kb = max(seen.pss_kb, pid_pss)
        self.peak_rss_kb = max(self.peak_rss_kb, rss)
        if with_pss:
            self.peak_pss_kb = max(self.peak_pss_kb, pss)

    @property
    def own_cpu_s(self) -> float:
        return sum(self.own_ticks.values()) / CLK_TCK

    def own_cpu_of(self, pid: int) -> float:
        return self.own_ticks.get(pid, 0) / CLK_TCK


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
    command: list[str],
    log_path: Path,
    output_dir: Path,
    timeout_s: float,
    extra_sessions: set[int],
    warm_parents: set[int] = frozenset(),
) -> tuple[dict[str, Any], Monitor]:
    """Run `flwr run` in its own session, polling it (and `extra_sessions`) until it ends."""
    started = time.monotonic()
    cpu_before = cpu_with_children_s(extra_sessions) if extra_sessions else 0.0
    with log_path.open("wb") as stream:
        process = subprocess.Popen(
            command, cwd=REPO, stdin=subprocess.DEVNULL, stdout=stream, stderr=subprocess.STDOUT, start_new_session=True
        )
    monitor = Monitor({process.pid, *extra_sessions}, set(warm_parents))
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
    if extra_sessions:  # the last ClientApp processes exit; poll once more to see them as zombies
        time.sleep(2.0)
        monitor.poll()
    deployment_cpu = cpu_with_children_s(extra_sessions) - cpu_before if extra_sessions else 0.0
    result = {
        "command": shlex.join(command),
        "log": str(log_path),
        "wall_s": round(time.monotonic() - started, 1),
        "timed_out": timed_out,
        # Simulation: every process of the run's session (Ray lives the whole run). Deployment: the
        # `flwr run` CLI's own, plus the SuperLink's, SuperNodes' (and warm parent's) sessions with reaped children.
        "cpu_s": round(deployment_cpu + monitor.own_cpu_of(process.pid) if extra_sessions else monitor.own_cpu_s, 1),
        "peak_rss_gb": round(monitor.peak_rss_kb / 2**20, 2),
        "peak_pss_gb": round(monitor.peak_pss_kb / 2**20, 2),
        "round_cpu_s": {
            r: round(cpu_at_round[r] - cpu_at_round[r - 1], 1) for r in cpu_at_round if r - 1 in cpu_at_round
        },
    }
    return result, monitor


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
    result = {"load_before": load_average()}
    measured, _ = flwr_run(command, work / "simulation.log", output, timeout_s, set())
    result.update(measured)
    result.update(run_folder_summary(output), load_after=load_average())
    return result


# --------------------------------------------------------------------------- per message
def message_kinds(nodes: int, rounds: int) -> list[str]:
    """What each ClientApp process of a run did, in start order: the data check asks every node,
    then each round trains on every node and evaluates on half (the default fractions)."""
    return ["query"] * nodes + (["train"] * nodes + ["evaluate"] * max(1, nodes // 2)) * rounds


def per_message(
    monitor: Monitor, warm_log: Path | None, nodes: int, rounds: int
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """CPU-s and peak memory per message, by kind (query / train / evaluate), and each message's numbers."""
    processes = sorted((p for p in monitor.clientapps.values() if p.kind == "process"), key=lambda p: p.pid)
    messages: list[dict[str, Any]] = []
    if warm_log is None:
        for process in processes:
            messages.append(
                {
                    "pid": process.pid,
                    "cpu_s": process.cpu_ticks / CLK_TCK,
                    "exact": process.exited,
                    "peak_rss_mb": process.hwm_kb / 1024,
                    "peak_pss_mb": process.pss_kb / 1024,
                }
            )
    else:
        children = [
            (int(m[1]), float(m[3]), int(m[4]))
            for m in WARM_CHILD_LINE.finditer(warm_log.read_text(errors="replace") if warm_log.exists() else "")
        ]
        children.sort()
        polled = {p.pid: p for p in monitor.clientapps.values() if p.kind == "child"}
        for (pid, cpu, rss_mb), shim in zip(children, processes, strict=False):
            messages.append(
                {
                    "pid": pid,
                    "cpu_s": cpu + shim.cpu_ticks / CLK_TCK,
                    "child_cpu_s": cpu,
                    "shim_cpu_s": shim.cpu_ticks / CLK_TCK,
                    "exact": shim.exited,
                    "peak_rss_mb": rss_mb,
                    "peak_pss_mb": polled[pid].pss_kb / 1024 if pid in polled else 0.0,
                }
            )
    kinds = message_kinds(nodes, rounds)
    if len(messages) != len(kinds):
        kinds = ["unknown"] * len(messages)  # a message retried or lost: no attribution
    summary: dict[str, Any] = {}
    for kind in [*dict.fromkeys(kinds), "all"]:
        chosen = [m for m, k in zip(messages, kinds, strict=True) if kind in (k, "all")]
        if not chosen:
            continue
        pss = [m["peak_pss_mb"] for m in chosen if m["peak_pss_mb"]]
        summary[kind] = {
            "count": len(chosen),
            "cpu_s_mean": round(statistics.mean(m["cpu_s"] for m in chosen), 3),
            "cpu_s_median": round(statistics.median(m["cpu_s"] for m in chosen), 3),
            "peak_rss_mb_mean": round(statistics.mean(m["peak_rss_mb"] for m in chosen)),
            "peak_pss_mb_mean": round(statistics.mean(pss)) if pss else None,
            "exact_cpu": sum(1 for m in chosen if m["exact"]),
        }
    return summary, messages


def bench_deployment(
    dataset: str, rounds: int, nodes: int, work: Path, timeout_s: float, up_flags: list[str], warm: bool
) -> dict[str, Any]:
    name = "deployment_warm" if warm else "deployment_cold"
    ports = free_port_block(3 + nodes)
    deploy_dir = work / f"{name}-deploy"
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
        *([] if warm else ["--cold"]),
    ]
    log(f"{name}: fedcifar-deploy up --nodes {nodes}{'' if warm else ' --cold'}")
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
        warm_parents = {record["pid"] for record in state["processes"] if record["name"] == "warm-start"}
        idle_before = cpu_with_children_s(sessions)
        time.sleep(IDLE_WINDOW_S)  # what the waiting SuperLink and SuperNodes cost by themselves
        result["idle_cpu_per_s"] = round((cpu_with_children_s(sessions) - idle_before) / IDLE_WINDOW_S, 3)
        output = work / name
        log(f"{name}: flwr run . local-deployment")
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
        measured, monitor = flwr_run(command, work / f"{name}.log", output, timeout_s, sessions, warm_parents)
        result.update(measured)
        result.update(run_folder_summary(output), load_after=load_average())
        warm_log = deploy_dir / "logs" / "warm-start.log" if warm else None
        result["per_message"], result["messages"] = per_message(monitor, warm_log, nodes, rounds)
        for node in range(nodes):
            node_log = deploy_dir / "logs" / f"supernode-{node}.log"
            result["cold_fallbacks"] = result.get("cold_fallbacks", 0) + node_log.read_text().count("starts cold")
    finally:
        subprocess.run([*deploy, "down", "--dir", str(deploy_dir)], cwd=REPO, env=env, capture_output=True, timeout=120)
    return result


# --------------------------------------------------------------------------- one process start
def bench_process_start(work: Path, repeats: int = 3) -> dict[str, Any]:
    """One `flwr-clientapp --help` (imports, parses, exits): cold by hand, and warm through a parent."""
    log("one process start: flwr-clientapp --help, cold and warm")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPROFILEIMPORTTIME"}
    cold = []
    for _ in range(repeats):
        process = subprocess.Popen([str(BIN / "flwr-clientapp"), "--help"], env=env, stdout=subprocess.DEVNULL)
        _, _, usage = os.wait4(process.pid, 0)
        cold.append((usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024))
    imports = []
    for _ in range(repeats):
        process = subprocess.Popen([sys.executable, "-c", CLIENTAPP_IMPORTS], cwd=REPO, env=env)
        _, _, usage = os.wait4(process.pid, 0)
        imports.append((usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024))

    folder = work / "warm-start"
    parent_log = work / "warm-start.log"
    with parent_log.open("wb") as stream:
        parent = subprocess.Popen(
            [str(BIN / "fedcifar-warm"), "--dir", str(folder)], env=env, stdout=stream, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 120
        while "ready on" not in parent_log.read_text():
            if parent.poll() is not None or time.monotonic() > deadline:
                return {"status": f"warm parent did not start: {parent_log.read_text()[-500:]}"}
            time.sleep(0.2)
        warm_env = dict(env, PATH=f"{folder / 'bin'}{os.pathsep}{BIN}{os.pathsep}{env.get('PATH', '')}")
        warm_env["FEDCIFAR_WARM_SOCKET"] = str(folder / "parent.sock")
        shims = []
        for _ in range(repeats):
            process = subprocess.Popen(["flwr-clientapp", "--help"], env=warm_env, stdout=subprocess.DEVNULL)
            _, _, usage = os.wait4(process.pid, 0)
            shims.append(usage.ru_utime + usage.ru_stime)
    finally:
        parent.send_signal(signal.SIGTERM)
        parent.wait(timeout=30)
    text = parent_log.read_text()
    children = [(float(m[3]), int(m[4])) for m in WARM_CHILD_LINE.finditer(text)]
    preload = re.search(r"in ([\d.]+) s, ([\d.]+) CPU-s\)", text)
    return {
        "cold_cpu_s": round(statistics.median(c for c, _ in cold), 3),
        "cold_peak_rss_mb": round(max(r for _, r in cold)),
        "imports_cpu_s": round(statistics.median(c for c, _ in imports), 3),
        "imports_peak_rss_mb": round(max(r for _, r in imports)),
        "warm_child_cpu_s": round(statistics.median(c for c, _ in children), 3) if children else None,
        "warm_shim_cpu_s": round(statistics.median(shims), 3),
        "warm_child_peak_rss_mb": max((r for _, r in children), default=None),
        "warm_parent_preload_cpu_s": float(preload[2]) if preload else None,
        "load": load_average(),
    }


# --------------------------------------------------------------------------- report
def summarise(results: dict[str, Any], nodes: int, rounds: int) -> list[str]:
    sim = results["simulation"]
    header = "| | " + " | ".join(f"round {r}" for r in range(1, rounds + 1))
    lines = [header + " | CPU-s per round | wall | CPU | peak RSS | peak PSS | accuracy | load |"]
    lines.append("|---" * (rounds + 8) + "|")
    for name in STARTS:
        run = results.get(name, {})
        seconds, cpu = run.get("round_seconds", {}), run.get("round_cpu_s", {})
        cells = [f"{seconds[r]:.1f} s" if r in seconds else "-" for r in range(1, rounds + 1)]
        per_round = ", ".join(str(cpu[r]) for r in sorted(cpu)) or "-"
        load = f"{run.get('load_before', ['?'])[0]} -> {run.get('load_after', ['?'])[0]}"
        accuracy = run.get("central_accuracy", {}).get(rounds)
        lines.append(
            f"| {LABELS[name]} | " + " | ".join(cells) + f" | {per_round} | {run.get('wall_s', '-')} s "
            f"| {run.get('cpu_s', '-')} s | {run.get('peak_rss_gb', '-')} GB | {run.get('peak_pss_gb', '-')} GB "
            f"| {accuracy} | {load} |"
        )
    lines.append("")
    for name in STARTS[1:]:
        run = results.get(name, {})
        ratios = [
            f"round {r}: {run['round_seconds'][r] / sim['round_seconds'][r]:.1f}x"
            for r in range(2, rounds + 1)
            if r in run.get("round_seconds", {}) and r in sim.get("round_seconds", {})
        ]
        cpu_ratios = [
            f"{run['round_cpu_s'][r] / sim['round_cpu_s'][r]:.1f}x"
            for r in range(2, rounds + 1)
            if r in run.get("round_cpu_s", {}) and sim.get("round_cpu_s", {}).get(r)
        ]
        lines.append(
            f"{LABELS[name]} / simulation: {', '.join(ratios)} in seconds; {', '.join(cpu_ratios)} in CPU; "
            f"idle deployment {run.get('idle_cpu_per_s')} CPU-s/s; cold fallbacks {run.get('cold_fallbacks')}"
        )
    lines.append("")
    lines.append("| message | cold: CPU-s | warm: CPU-s (child + shim) | cold: peak RSS / PSS | warm: peak RSS / PSS |")
    lines.append("|---|---|---|---|---|")
    cold = results.get("deployment_cold", {}).get("per_message", {})
    warm = results.get("deployment_warm", {}).get("per_message", {})
    for kind in dict.fromkeys([*cold, *warm]):
        c, w = cold.get(kind, {}), warm.get(kind, {})
        lines.append(
            f"| {kind} (x{c.get('count', w.get('count'))}) | {c.get('cpu_s_mean')} | {w.get('cpu_s_mean')} "
            f"| {c.get('peak_rss_mb_mean')} / {c.get('peak_pss_mb_mean')} MB "
            f"| {w.get('peak_rss_mb_mean')} / {w.get('peak_pss_mb_mean')} MB |"
        )
    start = results.get("process_start", {})
    lines.append("")
    lines.append(
        f"one `flwr-clientapp --help`: cold {start.get('cold_cpu_s')} CPU-s, {start.get('cold_peak_rss_mb')} MB "
        f"(its imports alone {start.get('imports_cpu_s')} CPU-s); warm child {start.get('warm_child_cpu_s')} CPU-s "
        f"+ shim {start.get('warm_shim_cpu_s')} CPU-s (warm parent's preload, once: "
        f"{start.get('warm_parent_preload_cpu_s')} CPU-s)"
    )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default=str(DEFAULT_DATASET), help="dataset for every run (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each run (default: %(default)s)")
    parser.add_argument("--nodes", type=int, default=10, help="SuperNodes of each run (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds each run may take (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "deployment.json", help="results JSON")
    parser.add_argument("--up-flag", action="append", default=[], help="extra `fedcifar-deploy up` flag (repeatable)")
    parser.add_argument(
        "--only", choices=STARTS, action="append", help="run only these (repeatable; default: all three)"
    )
    args = parser.parse_args(argv)
    if args.dataset != "synthetic" and not Path(args.dataset).is_dir():
        parser.error(f"--dataset {args.dataset} is not a folder; pass the CIFAR-10 parquet copy or 'synthetic'")
    chosen = args.only or list(STARTS)

    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "cores": len(os.sched_getaffinity(0))}
    up_flags = [f for flag in args.up_flag for f in flag.split()]
    with tempfile.TemporaryDirectory(prefix="fedcifar-deploy-bench-") as tmp:
        work = Path(tmp)
        os.environ.setdefault("FEDCIFAR_CACHE_DIR", str(work / "cache"))
        results["process_start"] = bench_process_start(work)
        if "simulation" in chosen:
            results["simulation"] = bench_simulation(args.dataset, args.rounds, args.nodes, work, args.timeout)
        for name in STARTS[1:]:
            if name in chosen:
                warm = name == "deployment_warm"
                results[name] = bench_deployment(
                    args.dataset, args.rounds, args.nodes, work, args.timeout, up_flags, warm
                )
        for name in chosen:  # keep the log tails: the folder goes away
            log_path = Path(results[name].get("log", "/nonexistent"))
            if log_path.is_file():
                results[name]["log_tail"] = log_path.read_text(errors="replace").splitlines()[-12:]
    results.setdefault("simulation", {})
    results["table"] = summarise(results, args.nodes, args.rounds)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print("\n".join(results["table"]))
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
