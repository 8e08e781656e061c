"""(3) and (5): the real `flwr run .`, in its own session, judged by what it wrote (status.json,
metrics.json), not by flwr's exit code: start-up to round 1, seconds and CPU per round, whole
run, peak memory of the process tree, accuracy."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import Quiet, load_average, log
from processes import TreeMonitor, end_tree

POLL_S = 0.25  # memory and progress polling interval of a flwr run


@dataclass(frozen=True)
class FlwrRunner:
    """How every `flwr run` of one benchmark invocation is started and bounded."""

    app_dir: Path  # --app: the Flower app folder `flwr run` runs (a modified copy, for experiments)
    workdir: Path  # logs and run folders
    timeout_s: float
    quiet: Quiet

    def run(
        self, label: str, cache_dir: Path, run_config: dict[str, str], federation_config: str | None
    ) -> dict[str, Any]:
        """`flwr run .` in its own session; returns timings, memory and the run's metrics."""
        out_dir = self.workdir / f"out-{label}"
        shutil.rmtree(out_dir, ignore_errors=True)  # the run folder found afterwards must be this run's
        log_path = self.workdir / f"{label}.log"
        pairs = " ".join(f"{k}={v}" for k, v in {**run_config, "output-dir": repr(str(out_dir))}.items())
        command = ["flwr", "run", ".", "--run-config", pairs]
        if federation_config:
            command += ["--federation-config", federation_config]
        env = {**os.environ, "FEDCIFAR_CACHE_DIR": str(cache_dir), "PYTHONUNBUFFERED": "1"}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        self.quiet.wait(label)
        log(f"{label}: {shlex.join(command)}")
        stamps: list[tuple[float, str]] = []
        load_before = load_average()
        started = time.time()
        process = subprocess.Popen(
            command,
            cwd=self.app_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            text=True,
            errors="replace",
        )

        def read_output() -> None:
            with log_path.open("w") as handle:
                for line in process.stdout:
                    stamps.append((time.time(), line.rstrip("\n")))
                    handle.write(f"{time.time() - started:8.2f}  {line}")
                    handle.flush()

        reader = threading.Thread(target=read_output, daemon=True)
        reader.start()
        monitor = TreeMonitor(process.pid)
        round_seen: dict[int, float] = {}  # round -> metrics.json mtime when that row first appeared
        timed_out = False
        round_cpu: dict[int, float] = {}  # round -> CPU seconds of the tree when its row appeared
        startup_cpu: list[dict[str, Any]] = []
        while process.poll() is None:
            monitor.poll()
            _watch_metrics(out_dir, round_seen)
            for r in round_seen:
                if r not in round_cpu:
                    round_cpu[r] = monitor.cpu_s()
                    if r == 0:
                        startup_cpu = monitor.cpu_by_process()
            if time.time() - started > self.timeout_s:
                timed_out = True
                end_tree(process.pid, monitor.seen)
                break
            time.sleep(POLL_S)
        process.wait()
        exited = time.time()
        reader.join(timeout=10)
        end_tree(process.pid, monitor.seen)  # anything the run left behind (it should leave nothing)
        _watch_metrics(out_dir, round_seen)
        result = _summarise_run(
            label, command, out_dir, log_path, started, exited, round_seen, stamps, monitor, timed_out, load_before
        )
        result["cpu_s"] = round(monitor.cpu_s(), 1)
        result["round_cpu_s"] = {
            str(r): round(round_cpu[r] - round_cpu[r - 1], 2) for r in sorted(round_cpu) if r - 1 in round_cpu
        }
        steady = [round_cpu[r] - round_cpu[r - 1] for r in (3, 4, 5) if r in round_cpu and r - 1 in round_cpu]
        result["steady_round_cpu_s"] = round(statistics.mean(steady), 2) if steady else None
        result["startup_cpu_s"] = round(round_cpu[0], 1) if 0 in round_cpu else None
        result["startup_cpu_by_process"] = startup_cpu
        result["cpu_by_process"] = monitor.cpu_by_process()
        return result


def _watch_metrics(out_dir: Path, round_seen: dict[int, float]) -> None:
    for metrics in out_dir.glob("*/metrics.json"):
        try:
            mtime = metrics.stat().st_mtime
            rows = json.loads(metrics.read_text())
        except (OSError, ValueError):
            return
        for row in rows:
            round_seen.setdefault(int(row["round"]), mtime)


def _first_stamp(stamps: list[tuple[float, str]], needle: str, started: float) -> float | None:
    for stamp, line in stamps:
        if needle in line:
            return round(stamp - started, 2)
    return None


def _summarise_run(
    label, command, out_dir, log_path, started, exited, round_seen, stamps, monitor, timed_out, load_before
) -> dict[str, Any]:
    folders = sorted(out_dir.glob("*/status.json"))
    result: dict[str, Any] = {
        "label": label,
        "command": shlex.join(command),
        "log": str(log_path),
        "timed_out": timed_out,
        "load_before": load_before,
        "load_after": load_average(),
        "wall_s": round(exited - started, 2),
        "peak_rss_gb": round(monitor.peak_rss_kb / 2**20, 3),
        "peak_pss_gb": round(monitor.peak_pss_kb / 2**20, 3),
        "peak_processes": monitor.peak_processes,
        "processes_at_pss_peak": monitor.at_peak,
    }
    if not folders:
        result["status"] = "no run folder"
        result["log_tail"] = [line for _, line in stamps[-15:]]
        return result
    folder = folders[0].parent
    status = json.loads((folder / "status.json").read_text())
    rows = json.loads((folder / "metrics.json").read_text()) if (folder / "metrics.json").exists() else []
    result.update(status=status["status"], reason=status.get("reason", ""), run_folder=str(folder))
    if status["status"] != "completed":
        result["log_tail"] = [line for _, line in stamps[-15:]]
    seconds = {int(r["round"]): r["seconds"] for r in rows}
    steady = [seconds[r] for r in (3, 4, 5) if r in seconds]
    last = max(seconds) if seconds else 0
    result.update(
        rounds=rows,
        round_seconds={str(k): v for k, v in seconds.items()},
        steady_round_s=round(statistics.mean(steady), 3) if steady else None,
        startup_to_round1_s=round(round_seen[0] - started, 2) if 0 in round_seen else None,
        run_to_completed_s=round((folder / "status.json").stat().st_mtime - started, 2),
        final_central_accuracy=rows[-1]["central-accuracy"] if rows else None,
        rounds_completed=last,
        # Where start-up goes, from when lines of the log arrived (seconds after the command started).
        startup_breakdown={
            "server_app_started": _first_stamp(stamps, "fedcifar_app run folder", started),
            "test_split_loaded": round((folder / "config.json").stat().st_mtime - started, 2),
            "nodes_connected": _first_stamp(stamps, "SuperNodes connected", started),
            "data_check_done": _first_stamp(stamps, "Data check:", started),
            "round0_central_eval_done": result.get("startup_to_round1_s"),
        },
        shutdown_s=round(exited - (folder / "status.json").stat().st_mtime, 2),
    )
    result["startup_breakdown"]["round0_central_eval_done"] = result["startup_to_round1_s"]
    return result
