"""Stopping a run: Ctrl-C / SIGTERM in simulation, `flwr stop` in deployment, and reading a run
folder's state (a silent death reads as "interrupted").

End-to-end tests run the real `flwr run .` (3 simulated SuperNodes, synthetic data) in a session
of its own, signal its whole process group as a terminal's Ctrl-C does, and judge the run by its
folder. Process checks look at the session: every member but zombies must be gone. The runs and the
deployment come from tests/support/ (flwr_run.FlwrRun, deployment.LocalDeployment).
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
from flwr.common.config import parse_config_args
from support.deployment import LocalDeployment
from support.flwr_run import SMALL_FEDERATION, SMALL_NODES, FlwrRun, flwr_environment

from fedcifar_app.config import RESUME_MUST_MATCH, RunConfig
from fedcifar_app.errors import ConfigError
from fedcifar_app.model import Net
from fedcifar_app.procfs import session_members
from fedcifar_app.pyproject import parse_overrides
from fedcifar_app.runs.checkpoint import Checkpoint
from fedcifar_app.runs.folder import METRICS
from fedcifar_app.runs.recorder import RunRecorder
from fedcifar_app.runs.status import STATUS, RunStatus, read_status, write_status
from fedcifar_app.server.run import load_resumed
from fedcifar_app.server.stopping import resume_command, typed_flwr_run

PLANNED_ROUNDS = 6
STOP_WITHIN_S = 15
RUN_TIMEOUT_S = 240
SYNTHETIC_3 = {"num-server-rounds": 3, "dataset": "synthetic"}
RESUME_LINE = re.compile(r"resume with: (flwr run .*)$", re.MULTILINE)


# --------------------------------------------------------------------------- helpers


def signal_after_round(tmp_path: Path, signum: int, after_round: int, *, group: bool = True) -> tuple[Path, float, str]:
    """Run PLANNED_ROUNDS rounds, send ``signum`` to the whole group (or to `flwr` alone) once ``after_round``
    is checkpointed; return the run folder, seconds until every process of the run was gone, the CLI output."""
    run = FlwrRun(
        tmp_path / "outputs",
        f"dataset='synthetic' {SMALL_NODES} num-server-rounds={PLANNED_ROUNDS}",
        env=flwr_environment(tmp_path / "cache"),
        federation_config=SMALL_FEDERATION,
        log_path=tmp_path / f"flwr-{signum}.log",
    ).start()
    try:
        run.wait_for(f"round {after_round}'s checkpoint", lambda: run.checkpoint_round() >= after_round)
        folder = run.folder
        signalled = time.monotonic()
        run.signal(signum, group=group)
        while (session_members(run.process.pid) or run.process.poll() is None) and (
            time.monotonic() - signalled < STOP_WITHIN_S + 15
        ):
            time.sleep(0.1)
        gone_after = time.monotonic() - signalled
        assert run.process.poll() is not None, f"flwr run still running {gone_after:.0f}s after the signal"
        assert not session_members(run.process.pid), f"left running: {session_members(run.process.pid)}"
        return folder, gone_after, run.output
    finally:
        run.kill()


def assert_stopped(folder: Path, gone_after: float, output: str, *, log_line: bool) -> list[int]:
    """The run stopped after its last checkpoint, within STOP_WITHIN_S, with the resume command in
    status.json and, where run.log has the line (``log_line``: it must, exactly once), the same there."""
    status = read_status(folder)
    assert status.state == "stopped", f"{status.raw}\n{output[-3000:]}"
    checkpoint = Checkpoint.load(folder)
    assert f"after round {checkpoint.round} of {PLANNED_ROUNDS}" in status.reason or (
        f"after round {checkpoint.round - 1} of" in status.reason  # the stop came while the checkpoint was written
    ), status.reason
    assert gone_after <= STOP_WITHIN_S, f"the run took {gone_after:.1f}s to end"
    rounds = [row["round"] for row in json.loads((folder / METRICS).read_text())]
    assert rounds == list(range(len(rounds))) and rounds[-1] < PLANNED_ROUNDS, rounds
    command = status.raw.get("resume-command")
    assert command and command.startswith("flwr run "), status.raw
    run_log = (folder / "run.log").read_text()
    lines = RESUME_LINE.findall(run_log)
    # The process may be killed before the log line is out (a signal to `flwr` alone), never twice.
    assert len(lines) == 1 if log_line else len(lines) <= 1, run_log
    assert all(line == command for line in lines), (lines, command)
    return rounds


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_ctrl_c_stops_the_run_and_the_printed_command_resumes_it(tmp_path):
    """SIGINT to the group (a terminal's Ctrl-C) after round 1 of 6: "stopped", nothing left running,
    one resume line; that exact command (on the same small federation) finishes rounds 2..6, each once."""
    folder, gone_after, output = signal_after_round(tmp_path, signal.SIGINT, after_round=1)
    rounds = assert_stopped(folder, gone_after, output, log_line=True)
    assert "Ctrl-C" in read_status(folder).reason

    printed = RESUME_LINE.findall((folder / "run.log").read_text())[0]
    assert printed in output, "the resume line is printed where the user typed the command"
    words = shlex.split(printed)
    # The command as typed (its --federation-config kept), with the run config that resumes.
    assert words[:3] == ["flwr", "run", "."] and len(words) == 7, words
    options = dict(zip(words[3::2], words[4::2], strict=True))
    assert set(options) == {"--federation-config", "--run-config"}, words
    assert options["--federation-config"] == SMALL_FEDERATION, options
    # That command (its run config, output-dir included, and its federation); a new folder beside.
    resume = FlwrRun(
        tmp_path / "outputs",
        options["--run-config"],
        env=flwr_environment(tmp_path / "cache"),
        federation_config=options["--federation-config"],
        log_path=tmp_path / "resume.log",
    )
    resume.start().wait(RUN_TIMEOUT_S)
    resumed = resume.folder
    assert resumed is not None and resumed != folder, resumed
    status = read_status(resumed)
    assert status.state == "completed", f"{status.raw}\n{resume.log_tail()}"
    rows = [row["round"] for row in resume.metrics]
    assert rows == list(range(PLANNED_ROUNDS + 1)), f"each round once: {rows} (stopped run had {rounds})"
    assert read_status(folder).state == "stopped", "resuming leaves the stopped folder as it was"


@pytest.mark.slow
def test_sigterm_to_flwr_alone_stops_the_run_like_ctrl_c(tmp_path):
    """`kill <flwr pid>` (SIGTERM to the CLI alone) after round 0: the CLI dies at once and would leave
    flower-simulation and Ray running on their own; the run notices and stops like a Ctrl-C. (SIGTERM to
    the whole group, as `timeout` sends it, goes the way of Ctrl-C: the engine shuts down.)"""
    folder, gone_after, output = signal_after_round(tmp_path, signal.SIGTERM, after_round=0, group=False)
    assert_stopped(folder, gone_after, output, log_line=False)


def test_a_run_gets_sigint_at_its_default_even_when_the_suite_ignores_it(tmp_path):
    """A suite started as a background job of a script inherits SIGINT ignored (POSIX shells do that) and
    an ignored signal stays ignored across exec: FlwrRun must not pass that on, or the Ctrl-C tests above
    see `flwr run` complete instead of stop."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        child = FlwrRun(tmp_path / "outputs", "", env=dict(os.environ), log_path=tmp_path / "child.log")
        child.command = [sys.executable, "-c", "import signal; print(signal.getsignal(signal.SIGINT))"]
        child.start().wait(60)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert child.output.strip() == str(signal.default_int_handler), child.output


# --------------------------------------------------------------------------- read_status


def write_running(folder: Path, **fields) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_status(folder, "running", **fields)
    return folder


def test_live_run_on_this_host_reads_running(tmp_path):
    status = read_status(write_running(tmp_path / "run"))
    assert (status.state, status.pid, status.host) == ("running", os.getpid(), socket.gethostname())


def test_dead_process_on_this_host_reads_interrupted(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    folder = write_running(tmp_path / "run")
    raw = json.loads((folder / STATUS).read_text())
    raw.update(pid=child.pid, **{"process-start": 1})
    (folder / STATUS).write_text(json.dumps(raw))
    status = read_status(folder)
    assert status.state == "interrupted" and status.recorded == "running", status
    assert str(child.pid) in status.why


def test_reused_pid_reads_interrupted(tmp_path):
    """Our own (live) pid, but recorded with another start time: the writer is not this process."""
    folder = write_running(tmp_path / "run")
    raw = json.loads((folder / STATUS).read_text())
    raw["process-start"] -= 1
    (folder / STATUS).write_text(json.dumps(raw))
    status = read_status(folder)
    assert status.state == "interrupted" and "another process" in status.why, status


def test_reboot_reads_interrupted(tmp_path):
    folder = write_running(tmp_path / "run", **{"boot-id": "another-boot"})
    assert read_status(folder).state == "interrupted"


@pytest.mark.parametrize(("age_s", "state"), [(100.0, "running"), (2000.0, "interrupted")])
def test_other_host_is_judged_by_its_last_update(tmp_path, age_s, state):
    folder = write_running(tmp_path / "run", host="another-host", **{"stale-after-s": 1500.0})
    updated = read_status(folder).updated.timestamp()
    status = read_status(folder, now=updated + age_s)
    assert status.state == state, status
    if state == "interrupted":
        assert "another-host" in status.why and "1500" in status.why


def test_finished_states_are_kept_and_a_missing_status_is_interrupted(tmp_path):
    for state in ("completed", "failed", "stopped"):
        folder = tmp_path / state
        folder.mkdir()
        write_status(folder, state, "why")
        assert read_status(folder).state == state
    assert read_status(tmp_path / "empty").state == "interrupted"


def test_first_format_status_without_process_fields(tmp_path):
    """Run folders written before status.json named its process: judged by age, naive local time."""
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / STATUS).write_text(json.dumps({"status": "running", "reason": "", "updated": "2020-01-01T00:00:00"}))
    assert read_status(folder).state == "interrupted"


# --------------------------------------------------------------------------- resume


def test_resume_command_round_trips_the_run_config(tmp_path):
    """Keys off the defaults, the ones a resume must match (whatever pyproject.toml says by then), the
    round count, the output folder of this run and resume-from; a quote in a path survives the shell."""
    outputs = tmp_path / "o'brien" / "outputs"
    run_config = {"num-server-rounds": 20, "dataset": "synthetic", "learning-rate": 0.01, "output-dir": str(outputs)}
    config = RunConfig.from_run_config(run_config)
    resumed = tmp_path / "elsewhere" / "20260101-000000"  # a run that resumed another stopped before its checkpoint
    line = resume_command(config, resumed, simulation=True)
    words = shlex.split(line)
    assert words[:4] == ["flwr", "run", ".", "--run-config"] and len(words) == 5
    values = parse_overrides(words[4])
    must_match = {key: config.to_run_config()[key] for key in RESUME_MUST_MATCH}
    assert values == {
        **must_match,
        "num-server-rounds": 20,
        "dataset": "synthetic",
        "learning-rate": 0.01,
        "output-dir": str(outputs),
        "resume-from": str(resumed),
    }
    assert parse_config_args([words[4]]) == values  # as Flower's own `flwr run` reads it


def test_resume_command_repeats_the_typed_federation_and_its_overrides(tmp_path):
    """A simulation's resume line is the `flwr run` the user typed (read from the CLI process's argv),
    its federation and --federation-config kept, its run config replaced: a run on a Ray cluster
    resumes on the cluster, not on the default federation."""
    federation_config = "options.num-supernodes=6 options.backend.init-args.address='auto'"
    typed = [
        *("/venv/bin/flwr", "run", ".", "ray-cluster", "--run-config", "num-server-rounds=9"),
        *("--federation-config", federation_config, "-c", "seed=3", "--run-config=batch-size=8"),
    ]
    # A process whose argv reads like the flwr CLI's (python -c ignores the words after its code); its
    # first line says it runs, so /proc holds its own argv and no longer the forking parent's.
    code = "import time; print('up', flush=True); time.sleep(30)"
    stand_in = subprocess.Popen([sys.executable, "-c", code, *typed], stdout=subprocess.PIPE, text=True)
    try:
        assert stand_in.stdout is not None and stand_in.stdout.readline() == "up\n"
        words = typed_flwr_run(stand_in.pid)
    finally:
        stand_in.kill()
        stand_in.wait()
    assert words == ["flwr", "run", ".", "ray-cluster", "--federation-config", federation_config]
    assert typed_flwr_run(os.getpid()) is None  # pytest is not `flwr run`

    config = RunConfig.from_run_config({"num-server-rounds": 9, "dataset": "synthetic"})
    folder = tmp_path / "outputs" / "20260101-000000"
    line = resume_command(config, folder, simulation=True, typed=words)
    assert line.startswith(f'flwr run . ray-cluster --federation-config "{federation_config}" --run-config "')
    resumed = shlex.split(line)
    assert resumed[:6] == words and resumed[6] == "--run-config", resumed
    assert parse_overrides(resumed[7])["resume-from"] == str(folder)


def test_resume_refuses_a_run_that_still_runs(tmp_path):
    """status.json says running and its process (this one) is alive: two runs must not share a checkpoint."""
    folder = tmp_path / "run"
    folder.mkdir()
    recorder = RunRecorder.start(folder, RunConfig.from_run_config(SYNTHETIC_3), None)
    recorder.finish_round(0, 2.3, 0.1, Net().state_dict())
    resume = RunConfig.from_run_config({**SYNTHETIC_3, "resume-from": str(folder)})
    with pytest.raises(ConfigError, match="is still running"):
        load_resumed(resume)
    recorder.set_status("stopped", "stopped by the test after round 0 of 3")
    assert load_resumed(resume).round == 0


# --------------------------------------------------------------------------- deployment


def wait_for_status(folder: Path, leaving: str, timeout_s: float = 60) -> RunStatus:
    deadline = time.monotonic() + timeout_s
    while read_status(folder).state == leaving and time.monotonic() < deadline:
        time.sleep(0.3)
    return read_status(folder)


@pytest.fixture
def deployment(tmp_path: Path):
    """`fedcifar-deploy up` with 2 SuperNodes (tests/support/deployment.py); every process ended after."""
    federation = LocalDeployment(tmp_path, flwr_environment(tmp_path / "cache"), nodes=2, spare_ports=0)
    try:
        federation.up()
        yield federation
    finally:
        federation.teardown()


@pytest.mark.slow
def test_flwr_stop_and_sigterm_in_deployment_record_stopped(deployment: LocalDeployment, tmp_path: Path):
    """`fedcifar-deploy up` (2 SuperNodes), two long runs on it: `flwr stop` after round 1, then SIGTERM
    to the ServerApp process (Flower's own handler) after round 0. Each: status "stopped" saying who,
    one resume line in run.log, and for `flwr stop` the line in the ServerApp's log (`flwr log`)."""

    def start_run(output_dir: Path, after_round: int) -> FlwrRun:
        config = (
            f"num-server-rounds=30 min-train-nodes=2 min-evaluate-nodes=1 min-available-nodes=2 dataset='synthetic' "
            f"output-dir='{output_dir}' node-wait-timeout=60 round-timeout=120"
        )
        run = deployment.start_run(config, output_dir)
        run.wait_for(f"round {after_round}'s checkpoint", lambda: run.checkpoint_round() >= after_round, RUN_TIMEOUT_S)
        return run

    def assert_one_resume_line(folder: Path) -> str:
        lines = RESUME_LINE.findall((folder / "run.log").read_text())
        assert len(lines) == 1 and "<federation>" in lines[0], lines
        assert read_status(folder).raw.get("resume-command") == lines[0]
        return lines[0]

    run = start_run(tmp_path / "stopped", after_round=1)
    stopped = deployment.flwr("stop", run.run_id)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    status = wait_for_status(run.folder, leaving="running")
    assert status.state == "stopped", status.raw
    assert "flwr stop" in status.reason and "after round" in status.reason, status.reason
    named = int(re.search(r"after round (\d+) of 30", status.reason)[1])
    rounds = [row["round"] for row in run.metrics]  # one row more if the stop came while a round was recorded
    assert rounds in (list(range(named + 1)), list(range(named + 2))), (rounds, status.reason)
    assert_one_resume_line(run.folder)
    shown = deployment.flwr("log", run.run_id, options=["--show"])
    assert "resume with: flwr run" in shown.stdout + shown.stderr, (shown.stdout + shown.stderr)[-3000:]

    run = start_run(tmp_path / "terminated", after_round=0)
    os.kill(read_status(run.folder).pid, signal.SIGTERM)  # flwr-serverapp, a child of the SuperLink
    status = wait_for_status(run.folder, leaving="running")
    assert status.state == "stopped", status.raw
    assert "Flower ended the ServerApp process" in status.reason and "after round" in status.reason, status.reason
    assert_one_resume_line(run.folder)
