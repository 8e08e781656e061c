"""Stopping a run: Ctrl-C / SIGTERM in simulation, `flwr stop` in deployment, and reading a run
folder's state (a silent death reads as "interrupted").

End-to-end tests run the real `flwr run .` (3 simulated SuperNodes, synthetic data) in a session
of its own, signal its whole process group as a terminal's Ctrl-C does, and judge the run by its
folder. Process checks look at the session: every member but zombies must be gone.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import SMALL_FEDERATION, SMALL_NODES

from fedcifar_app import results
from fedcifar_app.app_config import parse_overrides
from fedcifar_app.config import ConfigError, RunConfig
from fedcifar_app.model import Net
from fedcifar_app.server_app import load_resumed
from fedcifar_app.stopping import resume_command

APP_DIR = Path(__file__).resolve().parents[1]
BIN_DIR = Path(sys.executable).parent
PLANNED_ROUNDS = 6
STOP_WITHIN_S = 15
RUN_TIMEOUT_S = 240
SYNTHETIC_3 = {"num-server-rounds": 3, "dataset": "synthetic"}
RESUME_LINE = re.compile(r"resume with: (flwr run .*)$", re.MULTILINE)


# --------------------------------------------------------------------------- helpers


def live_session_members(session_id: int) -> list[str]:
    """'pid comm state' of each process of the session that is not a zombie."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[3]) == session_id and fields[0] != "Z":
            members.append(f"{entry.name} {stat[stat.find('(') : stat.rfind(')') + 1]} {fields[0]}")
    return members


def end_session(session_id: int) -> None:
    for line in live_session_members(session_id):
        try:
            os.kill(int(line.split()[0]), signal.SIGKILL)
        except ProcessLookupError:
            pass


def flwr_env(cache_dir: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}",
        "FEDCIFAR_CACHE_DIR": str(cache_dir),
    }


def start_flwr(command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    with log.open("wb") as out:  # a file: a stray child can never block on a full pipe
        return subprocess.Popen(
            command, cwd=APP_DIR, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip


def only_run_folder(output_dir: Path) -> Path | None:
    folders = sorted(path for path in output_dir.glob("*") if path.is_dir()) if output_dir.exists() else []
    assert len(folders) <= 1, folders
    return folders[0] if folders else None


def wait_for_checkpoint(process: subprocess.Popen, output_dir: Path, round_number: int, log: Path) -> Path:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        folder = only_run_folder(output_dir)
        if folder is not None and (folder / results.CHECKPOINT).exists():
            saved = torch.load(folder / results.CHECKPOINT, map_location="cpu", weights_only=True)
            if saved["round"] >= round_number:
                return folder
        assert process.poll() is None, f"flwr run ended before round {round_number}:\n{log.read_text()[-3000:]}"
        time.sleep(0.1)
    pytest.fail(f"no checkpoint of round {round_number} within {RUN_TIMEOUT_S}s:\n{log.read_text()[-3000:]}")


def signal_after_round(tmp_path: Path, signum: int, after_round: int, *, group: bool = True) -> tuple[Path, float, str]:
    """Run PLANNED_ROUNDS rounds, send ``signum`` to the whole group (or to `flwr` alone) once ``after_round``
    is checkpointed; return the run folder, seconds until every process of the run was gone, the CLI output."""
    output_dir, log = tmp_path / "outputs", tmp_path / f"flwr-{signum}.log"
    config = f"dataset='synthetic' {SMALL_NODES} num-server-rounds={PLANNED_ROUNDS} output-dir='{output_dir}'"
    command = [str(BIN_DIR / "flwr"), "run", ".", "--run-config", config, "--federation-config", SMALL_FEDERATION]
    process = start_flwr(command, log, flwr_env(tmp_path / "cache"))
    try:
        folder = wait_for_checkpoint(process, output_dir, after_round, log)
        signalled = time.monotonic()
        (os.killpg if group else os.kill)(process.pid, signum)
        while (live_session_members(process.pid) or process.poll() is None) and (
            time.monotonic() - signalled < STOP_WITHIN_S + 15
        ):
            time.sleep(0.1)
        gone_after = time.monotonic() - signalled
        assert process.poll() is not None, f"flwr run still running {gone_after:.0f}s after the signal"
        assert not live_session_members(process.pid), f"left running: {live_session_members(process.pid)}"
        return folder, gone_after, log.read_text(errors="replace")
    finally:
        end_session(process.pid)
        if process.poll() is None:
            process.kill()
            process.wait()


def assert_stopped(folder: Path, gone_after: float, output: str) -> list[int]:
    status = results.read_status(folder)
    assert status.state == "stopped", f"{status.raw}\n{output[-3000:]}"
    checkpoint = results.Checkpoint.load(folder)
    assert f"after round {checkpoint.round} of {PLANNED_ROUNDS}" in status.reason or (
        f"after round {checkpoint.round - 1} of" in status.reason  # the stop came while the checkpoint was written
    ), status.reason
    assert gone_after <= STOP_WITHIN_S, f"the run took {gone_after:.1f}s to end"
    rounds = [row["round"] for row in json.loads((folder / results.METRICS).read_text())]
    assert rounds == list(range(len(rounds))) and rounds[-1] < PLANNED_ROUNDS, rounds
    run_log = (folder / "run.log").read_text()
    assert len(RESUME_LINE.findall(run_log)) == 1, run_log
    return rounds


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_ctrl_c_stops_the_run_and_the_printed_command_resumes_it(tmp_path):
    """SIGINT to the group (a terminal's Ctrl-C) after round 1 of 6: "stopped", nothing left running,
    one resume line; that exact command (on the same small federation) finishes rounds 2..6, each once."""
    folder, gone_after, output = signal_after_round(tmp_path, signal.SIGINT, after_round=1)
    rounds = assert_stopped(folder, gone_after, output)
    assert "Ctrl-C" in results.read_status(folder).reason

    printed = RESUME_LINE.findall((folder / "run.log").read_text())[0]
    assert printed in output, "the resume line is printed where the user typed the command"
    command = shlex.split(printed) + ["--federation-config", SMALL_FEDERATION]
    log = tmp_path / "resume.log"
    process = start_flwr([str(BIN_DIR / "flwr"), *command[1:]], log, flwr_env(tmp_path / "cache"))
    try:
        process.wait(timeout=RUN_TIMEOUT_S)
    finally:
        end_session(process.pid)
    resumed = [path for path in (tmp_path / "outputs").glob("*") if path.is_dir() and path != folder]
    assert len(resumed) == 1, resumed
    status = results.read_status(resumed[0])
    assert status.state == "completed", f"{status.raw}\n{log.read_text()[-3000:]}"
    rows = [row["round"] for row in json.loads((resumed[0] / results.METRICS).read_text())]
    assert rows == list(range(PLANNED_ROUNDS + 1)), f"each round once: {rows} (stopped run had {rounds})"
    assert results.read_status(folder).state == "stopped", "resuming leaves the stopped folder as it was"


@pytest.mark.slow
def test_sigterm_to_flwr_alone_stops_the_run_like_ctrl_c(tmp_path):
    """`kill <flwr pid>` (SIGTERM to the CLI alone) after round 0: the CLI dies at once and would leave
    flower-simulation and Ray running on their own; the run notices and stops like a Ctrl-C. (SIGTERM to
    the whole group, as `timeout` sends it, goes the way of Ctrl-C: the engine shuts down.)"""
    folder, gone_after, output = signal_after_round(tmp_path, signal.SIGTERM, after_round=0, group=False)
    assert_stopped(folder, gone_after, output)


# --------------------------------------------------------------------------- read_status


def write_running(folder: Path, **fields) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    results.write_status(folder, "running", **fields)
    return folder


def test_live_run_on_this_host_reads_running(tmp_path):
    status = results.read_status(write_running(tmp_path / "run"))
    assert (status.state, status.pid, status.host) == ("running", os.getpid(), socket.gethostname())


def test_dead_process_on_this_host_reads_interrupted(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    folder = write_running(tmp_path / "run")
    raw = json.loads((folder / results.STATUS).read_text())
    raw.update(pid=child.pid, **{"process-start": 1})
    (folder / results.STATUS).write_text(json.dumps(raw))
    status = results.read_status(folder)
    assert status.state == "interrupted" and status.recorded == "running", status
    assert str(child.pid) in status.why


def test_reused_pid_reads_interrupted(tmp_path):
    """Our own (live) pid, but recorded with another start time: the writer is not this process."""
    folder = write_running(tmp_path / "run")
    raw = json.loads((folder / results.STATUS).read_text())
    raw["process-start"] -= 1
    (folder / results.STATUS).write_text(json.dumps(raw))
    status = results.read_status(folder)
    assert status.state == "interrupted" and "another process" in status.why, status


def test_reboot_reads_interrupted(tmp_path):
    folder = write_running(tmp_path / "run", **{"boot-id": "another-boot"})
    assert results.read_status(folder).state == "interrupted"


@pytest.mark.parametrize(("age_s", "state"), [(100.0, "running"), (2000.0, "interrupted")])
def test_other_host_is_judged_by_its_last_update(tmp_path, age_s, state):
    folder = write_running(tmp_path / "run", host="another-host", **{"stale-after-s": 1500.0})
    updated = results.read_status(folder).updated.timestamp()
    status = results.read_status(folder, now=updated + age_s)
    assert status.state == state, status
    if state == "interrupted":
        assert "another-host" in status.why and "1500" in status.why


def test_finished_states_are_kept_and_a_missing_status_is_interrupted(tmp_path):
    for state in ("completed", "failed", "stopped"):
        folder = tmp_path / state
        folder.mkdir()
        results.write_status(folder, state, "why")
        assert results.read_status(folder).state == state
    assert results.read_status(tmp_path / "empty").state == "interrupted"


def test_first_format_status_without_process_fields(tmp_path):
    """Run folders written before status.json named its process: judged by age, naive local time."""
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / results.STATUS).write_text(
        json.dumps({"status": "running", "reason": "", "updated": "2020-01-01T00:00:00"})
    )
    assert results.read_status(folder).state == "interrupted"


# --------------------------------------------------------------------------- resume


def test_resume_command_round_trips_the_run_config(tmp_path):
    config = RunConfig.from_run_config({"num-server-rounds": 20, "dataset": "synthetic", "learning-rate": 0.01})
    folder = tmp_path / "outputs" / "20260101-000000"
    line = resume_command(config, folder, simulation=True)
    words = shlex.split(line)
    assert words[:4] == ["flwr", "run", ".", "--run-config"] and len(words) == 5
    values = parse_overrides(words[4])
    assert values == {
        "num-server-rounds": 20,
        "dataset": "synthetic",
        "learning-rate": 0.01,
        "output-dir": str(folder.parent),
        "resume-from": str(folder),
    }


def test_resume_refuses_a_run_that_still_runs(tmp_path):
    """status.json says running and its process (this one) is alive: two runs must not share a checkpoint."""
    folder = tmp_path / "run"
    folder.mkdir()
    recorder = results.RunRecorder.start(folder, RunConfig.from_run_config(SYNTHETIC_3), None)
    recorder.finish_round(0, 2.3, 0.1, Net().state_dict())
    resume = RunConfig.from_run_config({**SYNTHETIC_3, "resume-from": str(folder)})
    with pytest.raises(ConfigError, match="is still running"):
        load_resumed(resume)
    recorder.set_status("stopped", "stopped by the test after round 0 of 3")
    assert load_resumed(resume).round == 0


# --------------------------------------------------------------------------- deployment


def free_ports(count: int) -> list[int]:
    """`count` consecutive ports free on 127.0.0.1 now."""
    for base in range(23000 + os.getpid() % 1000 * 20, 60000, 97):
        try:
            for port in range(base, base + count):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        return list(range(base, base + count))
    raise RuntimeError("no free ports")


def bounded(command: list[str], cwd: Path, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        check=False, start_new_session=True,
    )  # fmt: skip


def wait_for_status(folder: Path, leaving: str, timeout_s: float = 60) -> results.RunStatus:
    deadline = time.monotonic() + timeout_s
    while results.read_status(folder).state == leaving and time.monotonic() < deadline:
        time.sleep(0.3)
    return results.read_status(folder)


@pytest.mark.slow
def test_flwr_stop_and_sigterm_in_deployment_record_stopped(tmp_path):
    """`fedcifar-deploy up` (2 SuperNodes), two long runs on it: `flwr stop` after round 1, then SIGTERM
    to the ServerApp process (Flower's own handler) after round 0. Each: status "stopped" saying who,
    one resume line in run.log, and for `flwr stop` the line in the ServerApp's log (`flwr log`)."""
    env = flwr_env(tmp_path / "cache")
    ports = free_ports(6)
    deploy_cli = [sys.executable, "-m", "fedcifar_app.deploy"]
    deploy_dir = tmp_path / "deploy"
    flwr = str(BIN_DIR / "flwr")
    federation = ["local-deployment", "--federation-config", f"address='127.0.0.1:{ports[2]}'"]

    def start_run(output_dir: Path, after_round: int) -> tuple[str, Path]:
        config = (
            f"num-server-rounds=30 min-train-nodes=2 min-evaluate-nodes=1 min-available-nodes=2 dataset='synthetic' "
            f"output-dir='{output_dir}' node-wait-timeout=60 round-timeout=120"
        )
        started = bounded([flwr, "run", ".", *federation, "--run-config", config, "--format", "json"], APP_DIR, env)
        answer = json.loads(started.stdout[started.stdout.find("{") :] or "{}")
        assert answer.get("success"), started.stdout + started.stderr
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while time.monotonic() < deadline:
            folder = only_run_folder(output_dir)
            if folder is not None and (folder / results.CHECKPOINT).exists():
                if (
                    torch.load(folder / results.CHECKPOINT, map_location="cpu", weights_only=True)["round"]
                    >= after_round
                ):
                    return str(answer["run-id"]), folder
            time.sleep(0.3)
        pytest.fail(f"no checkpoint of round {after_round} in {output_dir}")

    def assert_one_resume_line(folder: Path) -> str:
        lines = RESUME_LINE.findall((folder / "run.log").read_text())
        assert len(lines) == 1 and "<federation>" in lines[0], lines
        return lines[0]

    up = bounded(
        [*deploy_cli, "up", "--dir", str(deploy_dir), "--nodes", "2", "--superlink-ports",
         ",".join(map(str, ports[:3])), "--clientappio-base-port", str(ports[3])],
        tmp_path, env,
    )  # fmt: skip
    try:
        assert up.returncode == 0, up.stdout + up.stderr

        run_id, folder = start_run(tmp_path / "stopped", after_round=1)
        stopped = bounded([flwr, "stop", run_id, ".", *federation], APP_DIR, env)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        status = wait_for_status(folder, leaving="running")
        assert status.state == "stopped", status.raw
        assert "flwr stop" in status.reason and "after round" in status.reason, status.reason
        assert len(json.loads((folder / results.METRICS).read_text())) < 31
        assert_one_resume_line(folder)
        shown = bounded([flwr, "log", run_id, ".", *federation, "--show"], APP_DIR, env, timeout=60)
        assert "resume with: flwr run" in shown.stdout + shown.stderr, (shown.stdout + shown.stderr)[-3000:]

        _, folder = start_run(tmp_path / "terminated", after_round=0)
        os.kill(results.read_status(folder).pid, signal.SIGTERM)  # flwr-serverapp, a child of the SuperLink
        status = wait_for_status(folder, leaving="running")
        assert status.state == "stopped", status.raw
        assert "Flower ended the ServerApp process" in status.reason and "after round" in status.reason, status.reason
        assert_one_resume_line(folder)
    finally:
        down = bounded([*deploy_cli, "down", "--dir", str(deploy_dir)], tmp_path, env)
        assert down.returncode == 0, down.stdout + down.stderr
