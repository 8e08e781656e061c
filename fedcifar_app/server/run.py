"""What the ServerApp runs: validate the run config, load the test split, wait for the nodes and check
their data, then the chosen strategy, handing each round to the run folder. Flower-free but for the
Grid and the records it talks through; ``server.app.main`` imports it when the run starts.
"""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import flwr
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid

from .. import training
from ..compat import is_simulation
from ..config import NodeData, RunConfig, absolute_path
from ..data import ImageTensors, check_dataset, class_names, load_node_data, load_split
from ..errors import ConfigError, RunFolderUnwritable, TrainingDiverged
from ..files import write_problem
from ..logs import APP_LOGGER
from ..model import Net, new_model
from ..runs.board import ScalarBoard
from ..runs.checkpoint import Checkpoint
from ..runs.folder import CHECKPOINT
from ..runs.metrics import CENTRAL_ACCURACY, CENTRAL_LOSS, format_row, summary_table
from ..runs.recorder import RunRecorder
from ..runs.status import read_status, write_status
from ..seeds import derive_seed
from .data_check import check_node_data
from .divergence import advice, blame
from .hooks import StrategyHooks, wait_for_nodes
from .hosts import HostLedger
from .stopping import RunStop, all_rounds_checkpointed, continue_command, typed_flwr_run
from .strategy_builder import build_strategy, nodes_sampled, server_state

logger = logging.getLogger(APP_LOGGER)


def run_federation(grid: Grid, context: Context, folder: Path, stop: RunStop) -> None:
    config = RunConfig.from_run_config(context.run_config)
    simulation = is_simulation(grid)
    typed = typed_flwr_run(os.getppid()) if simulation else None  # now: after a Ctrl-C the CLI may be gone
    stop.on_stop = lambda who: record_stop(None, config, folder, who, simulation=simulation, typed=typed)
    grid = stop.listen(grid)  # from here a stop is recorded (loading the data can take minutes)
    device = training.pick_device(config.device)
    logger.info("fedcifar_app run folder: %s", folder)
    logger.info(
        "Server on %s | PyTorch %s | Flower %s | Python %s | %s | dataset %s",
        device,
        torch.__version__,
        flwr.__version__,
        platform.python_version(),
        "simulation" if simulation else "deployment",
        config.dataset,
    )

    # Start-up work that needs no node runs beside the engine's start-up (Ray, actors importing torch):
    # in simulation the train split is decoded for the nodes on this machine (a cold cache), then round
    # 0's central evaluation, then samples.png (benchmarks/README.md, start-up).
    beside_startup = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedcifar-startup")
    try:
        check_dataset(config.dataset)
        if simulation:  # any error is the nodes' to report, in the data check
            beside_startup.submit(load_split, config.dataset, "train")
        test_data = load_split(config.dataset, "test")
        resumed = load_resumed(config)
        stop.check()  # a stop while loading was recorded; "running" must not replace it
        recorder = RunRecorder.start(
            folder,
            config,
            resumed,
            continue_command=lambda last_round: continue_command(
                config, folder, last_round, simulation=simulation, typed=typed
            ),
        )
        stop.on_stop = lambda who: record_stop(recorder, config, folder, who, simulation=simulation, typed=typed)
        if stop.requested:  # it came while the recorder started and wrote "running": put "stopped" back
            write_stopped(recorder, config, folder, stop.who, simulation=simulation, typed=typed)
            stop.check()

        weights = resumed.weights if resumed else new_model(derive_seed(config.seed, "init")).state_dict()
        initial_evaluation = (
            None if resumed else beside_startup.submit(evaluate_weights, Net(), weights, test_data, device)
        )
        needed = max(config.min_available_nodes, config.min_train_nodes, config.min_evaluate_nodes)
        node_ids = wait_for_nodes(grid, needed, config.node_wait_timeout, simulation=simulation)
        logger.info("Federation: %d SuperNodes connected (%d needed)", len(node_ids), needed)
        beside_startup.submit(write_samples, folder, config, num_partitions=len(node_ids))
        hosts = HostLedger()
        node_names = check_node_data(grid, node_ids, config, simulation=simulation, hosts=hosts)
    except BaseException:
        beside_startup.shutdown(wait=False, cancel_futures=True)  # not needed any more: the error need not wait
        raise
    beside_startup.shutdown()  # round 0 and samples.png are done before round 1

    hooks = StrategyHooks(
        recorder=recorder,
        needed_nodes=needed,
        min_train_nodes=config.min_train_nodes,
        node_wait_timeout=config.node_wait_timeout,
        round_timeout=config.round_timeout,
        simulation=simulation,
        node_names=node_names,
        at_round_boundary=stop.at_round_boundary,
        hosts=hosts,
        resume_hint=lambda: resume_hint(recorder, config, folder, simulation=simulation, typed=typed),
    )
    strategy = build_strategy(config, hooks, len(node_ids), resumed.server_state if resumed else None)
    recorder.server_state = lambda: server_state(strategy, config)
    logger.info("Strategy: %s (dp %s)", config.strategy, config.dp.value)
    board = ScalarBoard(folder)
    model = Net()

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Evaluate the global model on the test split; this closes the round's record."""
        if resumed is not None and server_round == 0:
            return None  # the resumed run's rounds are already recorded
        global_weights = arrays.to_torch_state_dict()  # fresh tensors: the recorder may keep them
        if server_round == 0 and initial_evaluation is not None:
            result = initial_evaluation.result()  # computed while the nodes started
        else:
            result = evaluate_weights(model, global_weights, test_data, device)
        row = recorder.finish_round(server_round, result.loss, result.accuracy, global_weights)
        board.add_row(row)
        logger.info("%s", format_row(row))
        return MetricRecord({CENTRAL_ACCURACY: result.accuracy, CENTRAL_LOSS: result.loss})

    train_config = ConfigRecord(
        {"learning-rate": config.learning_rate, "local-epochs": config.local_epochs, "batch-size": config.batch_size}
    )
    try:
        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(weights),
            num_rounds=config.num_server_rounds - recorder.round_offset,
            timeout=config.round_timeout,
            train_config=train_config,
            evaluate_fn=central_evaluate,
        )
    except TrainingDiverged as err:
        sampled = nodes_sampled(config, len(node_ids))
        raise TrainingDiverged(f"{err}{diverged_advice(config, hooks, sampled, folder)}") from err
    board.close()  # each row is flushed as written, so a run that raises above loses no scalars
    recorder.finish_run(result.arrays.to_torch_state_dict() if len(result.arrays) else weights)
    stop.close()  # completed: a stop from here on changes nothing (one that came after the last round stays)
    logger.info("Results per round:\n%s", summary_table(recorder.rows))
    if served := hosts.summary():
        logger.info("Served by %s", served)
    logger.info("Run folder (status: %s): %s", recorder.status, folder)


def evaluate_weights(
    model: Net, weights: Mapping[str, torch.Tensor], test_data: ImageTensors, device: torch.device
) -> training.EvalResult:
    """The central evaluation: ``weights`` in ``model`` on the test split (round 0's runs beside the
    ServerApp thread, in a model of its own)."""
    model.load_state_dict(weights)
    return training.evaluate(model, test_data, device)


def load_resumed(config: RunConfig) -> Checkpoint | None:
    """The checkpoint to continue from; a run that still runs is refused (two runs would share it)."""
    if not config.resume_from:
        return None
    source = absolute_path(config.resume_from)
    resumed = Checkpoint.load(source)
    try:
        previous = read_status(source)
    except ValueError as err:
        raise ConfigError(f"run-config resume-from={str(source)!r}: {err}") from None
    except OSError as err:  # an unreadable status.json (its permissions)
        raise ConfigError(
            f"run-config resume-from={str(source)!r}: {err.filename} cannot be read ({err.strerror}); make it readable"
        ) from None
    if previous.state == "running":
        raise ConfigError(
            f"run-config resume-from={str(source)!r} is still running (pid {previous.pid} on {previous.host}, "
            f"updated {previous.updated}): stop it first (Ctrl-C, or flwr stop <run-id>), then resume"
        )
    resumed.check_compatible(config)
    detail = previous.why or previous.reason
    logger.info(
        "Resuming %s after round %d (it was %s%s)",
        source,
        resumed.round,
        previous.state,
        f": {detail}" if detail else "",
    )
    return resumed


def resume_hint(
    recorder: RunRecorder, config: RunConfig, folder: Path, *, simulation: bool, typed: list[str] | None
) -> str:
    """ "; resume with: <command>" for a run that ends early, or "" when nothing can be resumed."""
    command = continue_command(config, folder, recorder.last_round, simulation=simulation, typed=typed)
    return f"; resume with: {command}" if command else ""


def record_stop(
    recorder: RunRecorder | None,
    config: RunConfig,
    folder: Path,
    who: str,
    *,
    simulation: bool,
    typed: list[str] | None = None,
) -> None:
    """Status "stopped" with who and after which round, and ONE line with the command that resumes (an
    ERROR line instead when status.json cannot be written: what failed, then that command)."""
    last = recorder.last_round if recorder is not None else -1
    try:
        reason, command = write_stopped(recorder, config, folder, who, simulation=simulation, typed=typed)
    except RunFolderUnwritable as err:  # its message ends with the command that continues
        logger.error("Run %s, and %s", stopped_reason(config, who, last), err)
        return
    except OSError as err:  # before the recorder: the folder is new, nothing in it to lose
        command = continue_command(config, folder, last, simulation=simulation, typed=typed)
        resume = f"; resume with: {command}" if command else ""
        problem = write_problem(err)[0]
        logger.error(
            "Run %s, and status.json could not be written (%s)%s", stopped_reason(config, who, last), problem, resume
        )
        return
    if command is not None:
        logger.warning("Run %s; resume with: %s", reason, command)
    elif all_rounds_checkpointed(config, last):
        logger.warning("Run %s; nothing is left to train: %s holds the trained model", reason, folder / CHECKPOINT)
    else:
        logger.warning("Run %s; no round was checkpointed, so start it again rather than resume", reason)


def stopped_reason(config: RunConfig, who: str, last_round: int) -> str:
    if last_round >= 0:
        return f"{who} after round {last_round} of {config.num_server_rounds}"
    return f"{who} before this run checkpointed a round"  # a resumed run continues from where it started


def write_stopped(
    recorder: RunRecorder | None,
    config: RunConfig,
    folder: Path,
    who: str,
    *,
    simulation: bool,
    typed: list[str] | None = None,
) -> tuple[str, str | None]:
    """Write status "stopped" (who, after which round, the command that continues: the process may be
    killed before the log line is out); return the reason and that command."""
    last = recorder.last_round if recorder is not None else -1
    reason = stopped_reason(config, who, last)
    command = continue_command(config, folder, last, simulation=simulation, typed=typed)
    if recorder is not None:
        recorder.set_status("stopped", reason, rounds=last if last >= 0 else None, **{"resume-command": command})
    else:
        write_status(folder, "stopped", reason, rounds=None, **{"resume-command": command})
    return reason, command


def diverged_advice(config: RunConfig, hooks: StrategyHooks, sampled: int, folder: Path) -> str:
    """What to change after NaN/inf: the likely key (from the last aggregation, see server.divergence),
    and where the last finite model is."""
    evidence = hooks.last_aggregation.evidence() if hooks.last_aggregation is not None else None
    hint = f": {advice(config, blame(config, evidence, sampled), sampled)}"
    if (folder / CHECKPOINT).exists():
        hint += f", then resume-from='{folder}' continues from the last finite round"
    return hint


def write_samples(folder: Path, config: RunConfig, num_partitions: int) -> None:
    """samples.png: partition 0's first training images; a plotting failure is a warning, never a failed run."""
    try:
        from ..runs.plots import SAMPLES
        from ..runs.plots import write_samples as plot_samples

        node = NodeData(partition_id=0, num_partitions=num_partitions)
        plot_samples(
            folder / SAMPLES,
            load_node_data(config, node).train,
            class_names(config.dataset),
            where=f"partition 0 of {num_partitions}",
        )
    except Exception as err:
        logger.warning("could not write samples.png (%s: %s); the run goes on", type(err).__name__, err)
