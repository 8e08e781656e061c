"""A run folder that can no longer be written: a full disk, a quota, a read-only file system, the folder
deleted mid-run.

What a resume needs (config.json, metrics.json, the models, checkpoint.pt, status.json) ends the run
with ONE line naming the file, the folder, the fix and the command that continues from the last
checkpoint; the files written before stay whole and no temporary file is left behind. The pictures,
TensorBoard and run.log only warn. Faults are injected at the atomic writer (``files``) as the kernel
raises them: EROFS/EACCES/EMFILE when the temporary file is created, ENOSPC/EDQUOT after half its bytes
landed; a deleted folder is deleted for real. The end-to-end test fills a real tmpfs under a real
`flwr run .` in a private mount namespace and resumes the run elsewhere.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from support.faults import CREATE_ERRORS, FaultyDisk, fail_path_call, private_tmpfs_problem
from support.flwr_run import SMALL_FEDERATION, SMALL_NODES, FlwrRun, flwr_environment
from support.inprocess import run_inprocess

from fedcifar_app import files
from fedcifar_app.config import RunConfig
from fedcifar_app.errors import ConfigError, RunAborted, RunFolderUnwritable
from fedcifar_app.logs import APP_LOGGER
from fedcifar_app.model import new_model
from fedcifar_app.pyproject import format_overrides, parse_overrides
from fedcifar_app.runs.checkpoint import Checkpoint
from fedcifar_app.runs.folder import BEST_MODEL, CHECKPOINT, CONFIG, FINAL_MODEL, METRICS, create_run_folder, unwritable
from fedcifar_app.runs.recorder import RunRecorder
from fedcifar_app.runs.run_log import RUN_LOG, run_log
from fedcifar_app.runs.status import STATUS, read_status
from fedcifar_app.server.app import record_failure
from fedcifar_app.server.run import record_stop
from fedcifar_app.server.stopping import continue_command

# (what the line says happened, the fix it names) per errno
SAYS = {
    errno.ENOSPC: ("the disk is full (No space left on device)", "Free space on it"),
    errno.EDQUOT: ("the disk quota is used up (Disk quota exceeded)", "Free space within the quota"),
    errno.EROFS: ("the file system is read-only (Read-only file system)", "Remount it read-write"),
    errno.EACCES: ("permission denied", "Give write permission back"),
    errno.EMFILE: (
        "this process has too many open files (Too many open files)",
        "Raise the open-files limit (ulimit -n)",
    ),
}


@pytest.fixture
def disk(monkeypatch) -> FaultyDisk:
    return FaultyDisk(monkeypatch)


def debris(folder: Path) -> list[str]:
    """Temporary files of the atomic writer left in ``folder``."""
    return sorted(path.name for path in folder.iterdir() if path.name.startswith("."))


CONFIG_3 = RunConfig(dataset="synthetic", num_server_rounds=3)


def start_recorder(folder: Path) -> RunRecorder:
    folder.mkdir(parents=True, exist_ok=True)
    return RunRecorder.start(
        folder,
        CONFIG_3,
        None,
        continue_command=lambda last: continue_command(CONFIG_3, folder, last, simulation=True),
    )


def expected_line(name: str, folder: Path, code: int, last_round: int) -> str:
    what, fix = SAYS[code]
    head = f"cannot write {name} in the run folder {folder}: {what}; the files written before are whole. "
    if last_round < 0:
        return head + f"{fix} or pass another output-dir, then start the run again (no round was checkpointed)"
    command = continue_command(CONFIG_3, folder, last_round, simulation=True)
    return head + (
        f"{fix} or change output-dir below to another folder, then continue from the checkpoint of round {last_round} "
        f"with: {command}"
    )


# --------------------------------------------------------------------------- the atomic writer


@pytest.mark.parametrize("code", sorted(SAYS))
def test_a_failed_atomic_write_keeps_the_old_file_and_removes_its_temporary_file(tmp_path, disk, code):
    target = tmp_path / "metrics.json"
    files.atomic_write_json(target, [{"round": 0}])
    disk.fail("metrics.json", code)
    with pytest.raises(OSError) as caught:
        files.atomic_write_json(target, [{"round": 0}, {"round": 1}])
    assert caught.value.errno == code
    assert json.loads(target.read_text()) == [{"round": 0}]
    assert debris(tmp_path) == []
    if code not in CREATE_ERRORS:  # the temporary file existed, half written, and is gone
        assert disk.temporaries and not any(path.exists() for path in disk.temporaries)


def test_the_original_error_surfaces_when_the_temporary_file_cannot_be_removed_either(tmp_path, disk, monkeypatch):
    disk.fail("status.json", errno.ENOSPC)
    monkeypatch.setattr(Path, "unlink", lambda self, missing_ok=False: (_ for _ in ()).throw(OSError(errno.EROFS, "x")))
    with pytest.raises(OSError) as caught:
        files.atomic_write_json(tmp_path / "status.json", {})
    assert caught.value.errno == errno.ENOSPC


# --------------------------------------------------------------------------- the recorder: what ends the run

# (file, the round whose write fails, the last checkpointed round at that moment)
RECORDER_WRITES = [
    (CONFIG, "start", -1),
    (METRICS, 1, 0),
    (BEST_MODEL, 1, 0),
    (CHECKPOINT, 1, 0),
    (STATUS, 1, 1),  # the heartbeat after round 1's checkpoint
    (FINAL_MODEL, "end", 1),
]


@pytest.mark.parametrize("code", sorted(SAYS))
@pytest.mark.parametrize(("name", "when", "last_round"), RECORDER_WRITES, ids=[w[0] for w in RECORDER_WRITES])
def test_a_run_folder_write_that_fails_ends_the_run_with_one_line(tmp_path, disk, name, when, last_round, code):
    folder = tmp_path / "out" / "20260101-000000"
    weights = new_model(0).state_dict()
    if when == "start":
        disk.fail(name, code)
        with pytest.raises(RunFolderUnwritable) as caught:
            start_recorder(folder)
    else:
        recorder = start_recorder(folder)
        recorder.finish_round(0, 2.3, 0.10, weights)
        if when == "end":
            recorder.finish_round(1, 2.0, 0.30, weights)
        disk.fail(name, code)
        with pytest.raises(RunFolderUnwritable) as caught:
            if when == "end":
                recorder.finish_run(weights)
            else:
                recorder.finish_round(1, 2.0, 0.30, weights)  # a better round: best_model.pt is written too

    assert str(caught.value) == expected_line(name, folder, code, last_round)
    assert caught.value.resume_command == continue_command(CONFIG_3, folder, last_round, simulation=True)
    assert debris(folder) == []
    if name != CONFIG:
        assert json.loads((folder / CONFIG).read_text())["num-server-rounds"] == 3
    if last_round >= 0:  # what was written before is whole: a resume reads it
        assert Checkpoint.load(folder).round == last_round
        rounds = [row["round"] for row in json.loads((folder / METRICS).read_text())]
        assert rounds[: last_round + 1] == list(range(last_round + 1)), rounds
        assert read_status(folder).recorded == "running"
        torch.load(folder / BEST_MODEL, weights_only=True)


def test_a_run_folder_deleted_mid_run_ends_the_run_with_one_line(tmp_path):
    folder = tmp_path / "out" / "20260101-000000"
    recorder = start_recorder(folder)
    recorder.finish_round(0, 2.3, 0.10, new_model(0).state_dict())
    shutil.rmtree(folder)
    with pytest.raises(RunFolderUnwritable) as caught:
        recorder.finish_round(1, 2.0, 0.30, new_model(0).state_dict())
    assert str(caught.value) == (
        f"cannot write {METRICS}: the run folder {folder} is gone (deleted or moved during the run), and its "
        "checkpoint with it. Start the run again, or, if you moved the folder, resume from its new place "
        "(run-config resume-from)"
    )


def test_a_resumed_run_without_a_checkpoint_of_its_own_continues_from_its_source(tmp_path, disk):
    source = tmp_path / "out" / "20260101-000000"
    start_recorder(source).finish_round(0, 2.3, 0.10, new_model(0).state_dict())
    config = RunConfig(dataset="synthetic", num_server_rounds=3, resume_from=str(source))
    folder = tmp_path / "out" / "20260101-000001"
    folder.mkdir()
    disk.fail(CONFIG, errno.ENOSPC)
    with pytest.raises(RunFolderUnwritable) as caught:
        RunRecorder.start(
            folder,
            config,
            Checkpoint.load(source),
            continue_command=lambda last: continue_command(config, folder, last, simulation=False),
        )
    command = caught.value.resume_command
    assert command is not None and str(caught.value).endswith(command)
    assert f"resume-from='{source}'" in command and command.startswith("flwr run . <federation> --run-config ")


@pytest.mark.parametrize("name", [FINAL_MODEL, STATUS])
def test_a_write_that_fails_after_the_last_round_says_the_trained_model_is_safe(tmp_path, disk, name):
    """Every round is in checkpoint.pt: a resume would be refused (no round left), so the line offers
    none; it names the checkpoint that holds the trained model."""
    folder = tmp_path / "out" / "20260101-000000"
    recorder = start_recorder(folder)
    for round_number in range(CONFIG_3.num_server_rounds + 1):
        recorder.finish_round(round_number, 2.0, 0.1 * round_number, new_model(0).state_dict())
    disk.fail(name, errno.ENOSPC)
    with pytest.raises(RunFolderUnwritable) as caught:
        recorder.finish_run(new_model(0).state_dict())
    what, fix = SAYS[errno.ENOSPC]
    assert str(caught.value) == (
        f"cannot write {name} in the run folder {folder}: {what}; the files written before are whole. {fix} before "
        f"the next run; no training is lost: every round is checkpointed, and {folder / CHECKPOINT} holds the trained "
        f"model of round 3 (missing: {FINAL_MODEL} and the plots)"
    )
    assert caught.value.resume_command is None
    assert Checkpoint.load(folder).round == 3


def test_a_deleted_folder_of_a_resumed_run_continues_from_its_source(tmp_path):
    """The folder took its own checkpoint with it; the run it resumed still holds one."""
    source = tmp_path / "out" / "20260101-000000"
    start_recorder(source).finish_round(0, 2.3, 0.10, new_model(0).state_dict())
    config = RunConfig(dataset="synthetic", num_server_rounds=3, resume_from=str(source))
    folder = tmp_path / "out" / "20260101-000001"
    folder.mkdir()
    recorder = RunRecorder.start(
        folder,
        config,
        Checkpoint.load(source),
        continue_command=lambda last: continue_command(config, folder, last, simulation=True),
    )
    recorder.finish_round(1, 2.0, 0.30, new_model(0).state_dict())
    shutil.rmtree(folder)
    with pytest.raises(RunFolderUnwritable) as caught:
        recorder.finish_round(2, 1.9, 0.35, new_model(0).state_dict())
    command = continue_command(config, folder, -1, simulation=True)
    assert command is not None and f"resume-from='{source}'" in command
    assert caught.value.resume_command == command
    assert str(caught.value) == (
        f"cannot write {METRICS}: the run folder {folder} is gone (deleted or moved during the run), and its "
        "checkpoint with it. If you moved the folder, resume from its new place (run-config resume-from); else "
        f"continue from round 0 of the run this one resumed with: {command}"
    )


def test_a_stop_whose_status_cannot_be_written_is_one_error_line_with_the_command(tmp_path, disk, caplog):
    folder = tmp_path / "out" / "20260101-000000"
    recorder = start_recorder(folder)
    recorder.finish_round(0, 2.3, 0.10, new_model(0).state_dict())
    recorder.finish_round(1, 2.0, 0.30, new_model(0).state_dict())
    disk.fail(STATUS, errno.ENOSPC)
    with caplog.at_level(logging.INFO, logger=APP_LOGGER):
        record_stop(recorder, CONFIG_3, folder, "stopped by Ctrl-C", simulation=True)
    lines = [(record.levelno, record.getMessage()) for record in caplog.records]
    command = continue_command(CONFIG_3, folder, 1, simulation=True)
    assert lines == [
        (
            logging.ERROR,
            "Run stopped by Ctrl-C after round 1 of 3, and " + expected_line(STATUS, folder, errno.ENOSPC, 1),
        )
    ]
    assert command is not None and lines[0][1].endswith(command)
    assert read_status(folder).recorded == "running"  # the last status that fitted


def test_a_stop_after_the_last_round_offers_no_resume(tmp_path, caplog):
    folder = tmp_path / "out" / "20260101-000000"
    recorder = start_recorder(folder)
    for round_number in range(CONFIG_3.num_server_rounds + 1):
        recorder.finish_round(round_number, 2.0, 0.1 * round_number, new_model(0).state_dict())
    with caplog.at_level(logging.INFO, logger=APP_LOGGER):
        record_stop(recorder, CONFIG_3, folder, "stopped by Ctrl-C", simulation=True)
    assert [record.getMessage() for record in caplog.records] == [
        f"Run stopped by Ctrl-C after round 3 of 3; nothing is left to train: {folder / CHECKPOINT} holds the "
        "trained model"
    ]
    status = read_status(folder)
    assert (status.state, status.raw["resume-command"]) == ("stopped", None)


def test_a_run_folder_that_cannot_be_created_is_a_config_error(tmp_path, monkeypatch):
    fail_path_call(monkeypatch, "mkdir", lambda path: path.parent == tmp_path, errno.ENOSPC)
    with pytest.raises(ConfigError, match=r"cannot create the run folder \S+ there: the disk is full"):
        create_run_folder(tmp_path)


# --------------------------------------------------------------------------- what only warns


class FailingStream(io.StringIO):
    def write(self, text: str) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_run_log_that_cannot_be_written_is_one_warning_and_no_traceback(tmp_path, caplog, capsys):
    logger = logging.getLogger("flwr.fedcifar_app")
    with caplog.at_level(logging.INFO), run_log(tmp_path) as path:
        logger.info("before the disk filled")
        (handler,) = [h for h in logging.getLogger("flwr").handlers if getattr(h, "baseFilename", "") == str(path)]
        handler.stream = FailingStream()
        logger.info("after: lost from run.log")
        logger.warning("another line")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and RUN_LOG in r.getMessage()]
    assert warnings == [
        f"{tmp_path / RUN_LOG} cannot be written (the disk is full (No space left on device)); the run goes on, "
        "its log lines only here"
    ]
    assert "Traceback" not in capsys.readouterr().err
    assert "before the disk filled" in path.read_text()


# --------------------------------------------------------------------------- the ServerApp's one line


def run_until_the_disk_fills(tmp_path, caplog, disk, *, full: bool):
    disk.fail(CHECKPOINT, errno.ENOSPC, after=2, full=full)  # rounds 0 and 1 checkpoint, round 2 does not
    values = parse_overrides(f"{SMALL_NODES} num-server-rounds=4 dataset='synthetic' output-dir='{tmp_path / 'out'}'")
    with caplog.at_level(logging.INFO):
        folder = run_inprocess(values)
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert not any(record.exc_info for record in caplog.records), "a traceback was logged"
    assert len(errors) == 1, errors
    config = RunConfig.from_run_config({**values})
    command = continue_command(config, folder, 1, simulation=True)
    what, fix = SAYS[errno.ENOSPC]
    expected = (
        f"cannot write {CHECKPOINT} in the run folder {folder}: {what}; the files written before are whole. "
        f"{fix} or change output-dir below to another folder, then continue from the checkpoint of round 1 with: "
        f"{command}"
    )
    return folder, errors[0], expected, command


def test_a_full_disk_ends_the_run_with_one_error_line_and_status_failed(tmp_path, caplog, disk):
    folder, line, expected, command = run_until_the_disk_fills(tmp_path, caplog, disk, full=False)
    assert line == expected
    status = read_status(folder)
    assert (status.state, status.reason, status.raw["resume-command"]) == ("failed", expected, command)
    assert Checkpoint.load(folder).round == 1 and debris(folder) == []


def test_when_status_json_cannot_be_written_either_the_line_says_so(tmp_path, caplog, disk):
    folder, line, expected, _ = run_until_the_disk_fills(tmp_path, caplog, disk, full=True)
    whole = "the files written before are whole"
    assert line == expected.replace(whole, f"{whole}; status.json could not be updated either")
    assert read_status(folder).recorded == "running"  # the last status that fitted
    assert Checkpoint.load(folder).round == 1 and debris(folder) == []


# --------------------------------------------------------------------------- a real full disk, end to end


def fill(pid: int, run_folder: Path) -> None:
    """Write a file beside the run folder until the disk under it is full (through /proc/<pid>/root, the
    namespace's view of the file system)."""
    inside = Path(f"/proc/{pid}/root") / run_folder.parent.relative_to("/")
    handle = os.open(inside / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while True:
            os.write(handle, b"\0" * 4096)
    except OSError as err:
        assert err.errno == errno.ENOSPC, err
    finally:
        os.close(handle)


def make_read_only(pid: int, run_folder: Path) -> None:
    """Make the run folder read-only under the running process: a read-only bind mount of it on itself, in
    the run's namespace (a plain `remount,ro` of the tmpfs is refused while run.log is open for writing;
    run.log goes on through the descriptor it has)."""
    subprocess.run(
        ["nsenter", "-t", str(pid), "-m", "sh", "-c", 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0"']
        + [str(run_folder)],
        check=True,
        capture_output=True,
        timeout=30,
    )


# fault -> (how the test makes it, what the line says happened, the fix it names)
REAL_FAULTS = {
    "disk-full": (fill, r"the disk is full \(No space left on device\)", "Free space on it"),
    "read-only": (make_read_only, r"the file system is read-only \(Read-only file system\)", "Remount it read-write"),
}


@pytest.mark.slow
@pytest.mark.skipif(bool(private_tmpfs_problem()), reason=private_tmpfs_problem() or "ok")
@pytest.mark.parametrize("fault", sorted(REAL_FAULTS))
def test_a_real_write_fault_ends_the_run_in_one_line_and_the_run_resumes_elsewhere(tmp_path, fault):
    """`flwr run .` writes into a 4 MB tmpfs mounted in its own mount namespace (never on the machine's
    mount table). After round 1's checkpoint the test fills that disk, or makes the run folder read-only:
    the run ends with one ERROR line and no traceback; the folder, copied out before the namespace goes,
    holds whole files and no temporary one; its printed command, pointed at a good output-dir and the
    copied folder, finishes the run (once: the disk-full case)."""
    if fault == "read-only" and shutil.which("nsenter") is None:
        pytest.skip("needs nsenter (util-linux)")
    make_fault, what, fix = REAL_FAULTS[fault]
    disk_dir, copy = tmp_path / "small-disk", tmp_path / "copied"
    disk_dir.mkdir()
    env = flwr_environment(tmp_path / "cache")
    # The shell mounts the tmpfs, runs flwr, then copies the disk out (the mount dies with the namespace).
    in_namespace = [
        "unshare",
        "-m",
        "sh",
        "-c",
        'mount -t tmpfs -o size=4m tmpfs "$0" && "$@"; status=$?; cp -a "$0" "$COPY"; exit $status',
        str(disk_dir),
    ]
    run = FlwrRun(
        disk_dir,
        f"dataset='synthetic' {SMALL_NODES} num-server-rounds=8",
        env={**env, "COPY": str(copy)},
        federation_config=SMALL_FEDERATION,
        prefix=in_namespace,
        log_path=tmp_path / f"{fault}.log",
    ).start()
    try:
        inside = Path(f"/proc/{run.process.pid}/root") / disk_dir.relative_to("/")

        def checkpointed_round_1() -> bool:
            (folder,) = [path for path in inside.iterdir() if path.is_dir()]
            return torch.load(folder / CHECKPOINT, weights_only=True)["round"] >= 1

        run.wait_for("round 1's checkpoint", checkpointed_round_1)
        (stamp,) = [path.name for path in inside.iterdir() if path.is_dir()]
        make_fault(run.process.pid, disk_dir / stamp)
        run.wait()
    finally:
        run.kill()

    output = run.output
    errors = [line for line in output.splitlines() if "ERROR" in line]
    assert len(errors) == 1, output[-4000:]
    assert "Traceback" not in output and "Exception" not in output, output[-4000:]
    folder = copy / stamp  # the copy of <disk>/<run folder>
    original = disk_dir / stamp
    found = re.search(
        rf"cannot write (\S+) in the run folder {re.escape(str(original))}: {what}; the files written before are "
        rf"whole(; status\.json could not be updated either)?\. {fix} or change output-dir below to another "
        r"folder, then continue from the checkpoint of round (\d+) with: (flwr run .*)$",
        errors[0],
    )
    assert found and found[1] in (METRICS, BEST_MODEL, CHECKPOINT, STATUS), errors[0]
    assert not (found[1] == STATUS and found[2]), "the line names status.json once"
    status_note, checkpoint_round, command = found[2], int(found[3]), found[4]

    checkpoint = Checkpoint.load(folder)  # whole, and the round the command continues from
    assert checkpoint.round == checkpoint_round >= 1
    rows = [row["round"] for row in json.loads((folder / METRICS).read_text())]
    assert rows[: checkpoint.round + 1] == list(range(checkpoint.round + 1)), rows
    json.loads((folder / CONFIG).read_text())
    # A read-only file system forbids removing the temporary file of a write it caught half-way (rare).
    assert len(debris(folder)) <= (1 if fault == "read-only" else 0), debris(folder)
    # The failure, or the last status that fitted: when the line says so, or when status.json is the file
    # that failed (the failure's own write may fit then, once the failed write's temporary file is gone).
    status = json.loads((folder / STATUS).read_text())
    expected_states = ("running", "failed") if found[1] == STATUS else ("running",) if status_note else ("failed",)
    assert status["status"] in expected_states, status
    if status["status"] == "failed":
        assert status["reason"] == errors[0].split("ERROR", 1)[1].split(":", 1)[1].strip()
        assert status["resume-command"] == command

    words = shlex.split(command)  # the flwr run that was typed, its federation override kept
    at = words.index("--run-config")
    assert words[:at] == ["flwr", "run", ".", "--federation-config", SMALL_FEDERATION] and len(words) == at + 2, words
    values = parse_overrides(words[at + 1])
    assert values["resume-from"] == str(original) and values["output-dir"] == str(disk_dir), values
    if fault != "disk-full":
        return
    good = tmp_path / "good"
    values.update({"output-dir": str(good), "resume-from": str(folder)})  # the folder as copied out
    resumed = FlwrRun(
        good, format_overrides(values), env=env, federation_config=SMALL_FEDERATION, log_path=tmp_path / "resume.log"
    )
    resumed.start().wait()
    assert resumed.status["status"] == "completed", resumed.log_tail()
    assert [row["round"] for row in resumed.metrics] == list(range(9))
    assert f"Resuming {folder} after round {checkpoint.round}" in resumed.output


def test_the_error_line_names_status_json_once_and_says_when_it_could_not_be_written(tmp_path, disk):
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    status_failed = unwritable(tmp_path / STATUS, full, 'flwr run . --run-config "num-server-rounds=3"', 2)
    disk.fail(STATUS, errno.ENOSPC)
    assert record_failure(tmp_path, str(status_failed), status_failed) == (str(status_failed), False)
    too_few = RunAborted("only 3 of the 4 SuperNodes needed connected within node-wait-timeout=5s")
    assert record_failure(tmp_path, str(too_few), too_few) == (
        f"{too_few}; status.json could not be written (the disk is full (No space left on device))",
        False,
    )
