"""Speed benchmark: the compute floor, the per-sample PIL data path, and the real `flwr run .`.

One command measures, in one invocation (see benchmarks/README.md for what each number means):

  data   the decode-once cache: cold decode of both splits, warm (memory-mapped) load, node partitions
  floor  (1) one round's training and evaluation work in this single plain PyTorch process on
         pre-decoded tensors (fedcifar_app.training + fedcifar_app.data): 10 IID clients train 1 local
         epoch each from the same global model, FedAvg, evaluation on half the clients' validation
         splits and on the central test split; several rounds, so the accuracy is checked too
  pil    (2) the same round's work on the usual example data path: Hugging Face rows indexed one by
         one, PIL decode, ToTensor, Normalize, DataLoader (what typical Flower examples do)
  flwr   (3) `flwr run .` with the default federation, with a cold cache and then a warm one:
         start-up to round 1, seconds per round, whole run, peak memory of the process tree, accuracy
  scale  (5) the same run with 1,000 virtual SuperNodes and fraction-train 0.01, plus the time to
         partition the train split 1,000 ways

    python benchmarks/benchmark.py                         # dataset: ../shared/data/cifar10
    python benchmarks/benchmark.py --dataset /path/to/cifar10 --out /tmp/results.json
    python benchmarks/benchmark.py --only floor flwr --federation-config "options.backend.client-resources.num-cpus=2"

Every `flwr run` starts in its own session (process group) and is ended as a whole on timeout.
Runs are judged by what they wrote (status.json, metrics.json), not by flwr's exit code.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATASET = (REPO.parent / "shared" / "data" / "cifar10").resolve()
DEFAULT_OUT = REPO / "benchmarks" / "results.json"
STEPS = ("data", "floor", "pil", "flwr", "scale")
POLL_S = 0.25  # memory and progress polling interval of a flwr run
GOALS = {
    "steady_round_vs_floor": 1.1,
    "whole_run_vs_5_floors_warm": 1.4,
    "whole_run_vs_5_floors_cold": 1.5,
    "startup_warm_s": 6.0,
    "peak_memory_gb": 3.0,
    "final_central_accuracy": 0.41,
    "scale_round_vs_10_nodes": 1.5,
}

sys.path.insert(0, str(REPO))  # run from a checkout without installing


# --------------------------------------------------------------------------- machine and helpers


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict[str, Any]:
    import flwr
    import torch

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gb = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {
        "host": platform.node(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": mem_gb,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads_default": torch.get_num_threads(),
        "flwr": flwr.__version__,
        "cuda": torch.cuda.is_available(),
    }


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


QUIET = {"load": 0.0, "max_wait_s": 0.0}  # --quiet-load / --quiet-wait


def wait_for_quiet(step: str) -> None:
    """On a shared machine, wait (bounded) until the 1-minute load average drops below --quiet-load."""
    if not QUIET["load"]:
        return
    started = time.monotonic()
    while os.getloadavg()[0] > QUIET["load"] and time.monotonic() - started < QUIET["max_wait_s"]:
        time.sleep(5)
    log(f"{step}: load average {load_average()} after waiting {time.monotonic() - started:.0f}s for quiet")


def default_run_config(dataset: str):
    """The app's run config from pyproject.toml, with ``dataset`` overridden (so the floor follows the app)."""
    import tomli

    from fedcifar_app.config import RunConfig

    values = tomli.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    values["dataset"] = dataset
    return RunConfig.from_run_config(values)


def federation_config(overrides: str | None = None, **options: Any) -> str:
    """The default federation's whole ``options`` table as ``--federation-config`` pairs, with overrides.

    Flower 1.25's ``--federation-config`` replaces the whole ``options`` table when given any
    ``options.*`` key (``flwr.common.config.fuse_dicts`` overwrites its own recursive merge), so
    ``"options.num-supernodes=1000"`` alone silently drops ``client-resources`` (Flower's default
    is then num-cpus=2: one client at a time, two torch threads) and ``init-args``. Passing every
    key keeps the federation what pyproject.toml says, plus the changes asked for.
    """
    import tomli
    from flwr.common.config import flatten_dict, parse_config_args

    federations = tomli.loads((APP_DIR["path"] / "pyproject.toml").read_text())["tool"]["flwr"]["federations"]
    flat = {k: v for k, v in flatten_dict(federations[federations["default"]]).items() if k.startswith("options.")}
    flat.update({f"options.{k}": v for k, v in options.items()})
    flat.update(parse_config_args([overrides]) if overrides else {})

    def toml_value(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        return repr(value) if isinstance(value, str) else str(value)

    return " ".join(f"{k}={toml_value(v)}" for k, v in flat.items())


# --------------------------------------------------------------------------- (0) data path


def bench_data(dataset: str, cache_dir: Path) -> dict[str, Any]:
    """Cold decode into a fresh cache, warm memory-mapped load, and the 10 nodes' partitions."""
    wait_for_quiet("bench_data")
    from fedcifar_app import data
    from fedcifar_app.config import NodeData

    os.environ["FEDCIFAR_CACHE_DIR"] = str(cache_dir)
    shutil.rmtree(cache_dir, ignore_errors=True)
    import pyarrow.parquet  # noqa: F401  imports are start-up cost, not decoding
    import torchvision.io  # noqa: F401

    result: dict[str, Any] = {"load_before": load_average()}
    for split in ("train", "test"):
        data.reset_process_caches()
        started, cpu = time.perf_counter(), time.process_time()
        tensors = data.load_split(dataset, split)
        result[f"cold_decode_{split}_s"] = round(time.perf_counter() - started, 3)
        result[f"cold_decode_{split}_cpu_s"] = round(time.process_time() - cpu, 3)
        result[f"{split}_images"] = len(tensors)
    data.reset_process_caches()
    started = time.perf_counter()
    train = data.load_split(dataset, "train")
    int(train.images[::997].sum())  # touch a few pages
    result["warm_load_train_s"] = round(time.perf_counter() - started, 4)
    result["decode_images_per_s"] = round(result["train_images"] / result["cold_decode_train_s"])

    config = default_run_config(dataset)
    data.reset_process_caches()  # the partitioner and node data are built again, the split mapped again
    started = time.perf_counter()
    for pid in range(10):
        data.load_node_data(config, NodeData(partition_id=pid, num_partitions=10))
    result["ten_node_partitions_s"] = round(time.perf_counter() - started, 3)
    result["load_after"] = load_average()
    return result


# --------------------------------------------------------------------------- (1) the compute floor


def fedavg(updates: list[tuple[dict, int]]) -> dict:
    """Weighted average by number of examples, as FedAvg(weighted_by_key='num-examples')."""
    total = sum(n for _, n in updates)
    keys = updates[0][0].keys()
    return {k: sum(w[k].double() * (n / total) for w, n in updates).to(updates[0][0][k].dtype) for k in keys}


def bench_floor(dataset: str, cache_dir: Path, rounds: int, threads: int | None) -> dict[str, Any]:
    """One round's work (train 10 clients, FedAvg, evaluate half the clients + the test split) per round."""
    import torch

    from fedcifar_app import data, training
    from fedcifar_app.config import NodeData
    from fedcifar_app.model import Net, new_model
    from fedcifar_app.seeds import derive_seed

    os.environ["FEDCIFAR_CACHE_DIR"] = str(cache_dir)
    if threads:
        torch.set_num_threads(threads)
    config = default_run_config(dataset)
    nodes = [NodeData(partition_id=i, num_partitions=10) for i in range(10)]
    parts = [data.load_node_data(config, node) for node in nodes]  # pre-decoded, not timed
    test = data.load_split(dataset, "test")
    device = torch.device("cpu")
    weights = new_model(derive_seed(config.seed, "init")).state_dict()
    model = Net()
    rows = []
    sampler = random.Random(config.seed)
    wait_for_quiet("floor")
    result: dict[str, Any] = {"load_before": load_average(), "torch_threads": torch.get_num_threads()}
    for server_round in range(1, rounds + 1):
        started, cpu_started = time.perf_counter(), time.process_time()
        updates, losses, train_s = [], [], []
        for node, part in zip(nodes, parts, strict=True):
            client_start = time.perf_counter()
            local = Net()
            local.load_state_dict(weights)
            loss = training.train(
                local,
                part.train,
                epochs=config.local_epochs,
                batch_size=config.batch_size,
                learning_rate=config.learning_rate,
                device=device,
                seed=derive_seed(config.seed, "train", server_round, node.label),
            )
            updates.append((training.get_weights(local), len(part.train)))
            losses.append(loss)
            train_s.append(time.perf_counter() - client_start)
        weights = fedavg(updates)
        trained = time.perf_counter()
        model.load_state_dict(weights)
        evaluated = [training.evaluate(model, parts[i].val, device) for i in sampler.sample(range(10), 5)]
        client_eval = time.perf_counter()
        central = training.evaluate(model, test, device)
        ended = time.perf_counter()
        rows.append(
            {
                "round": server_round,
                "seconds": round(ended - started, 3),
                "cpu_s": round(time.process_time() - cpu_started, 3),
                "train_s": round(trained - started, 3),
                "client_eval_s": round(client_eval - trained, 3),
                "central_eval_s": round(ended - client_eval, 3),
                "mean_client_train_s": round(statistics.mean(train_s), 3),
                "eval_accuracy": round(
                    sum(r.accuracy * r.num_examples for r in evaluated) / sum(r.num_examples for r in evaluated), 4
                ),
                "central_accuracy": round(central.accuracy, 4),
            }
        )
        log(
            f"floor round {server_round}: {rows[-1]['seconds']:.2f}s (train {rows[-1]['train_s']:.2f}s, "
            f"central eval {rows[-1]['central_eval_s']:.2f}s) central-acc {central.accuracy:.4f}"
        )
    seconds = [r["seconds"] for r in rows]
    train_samples = sum(len(p.train) for p in parts)
    result.update(
        rounds=rows,
        round_s=round(statistics.median(seconds), 3),
        round_cpu_s=round(statistics.median(r["cpu_s"] for r in rows), 3),
        round_min_s=min(seconds),
        train_images_per_s=round(train_samples / statistics.median(r["train_s"] for r in rows)),
        final_central_accuracy=rows[-1]["central_accuracy"],
        load_after=load_average(),
    )
    return result


def add_floor_rounds(
    results: dict[str, Any],
    dataset: str,
    cache_dir: Path,
    thread_counts: list[int],
    *,
    first_rounds: int,
    other_rounds: int,
) -> None:
    """Run floor rounds for every thread count, then recompute each variant over all its rounds so far.

    The floor is the faster variant (its best round; noise only adds time). Calling this between the
    flwr runs spreads the floor's rounds over the same stretch of (shared-machine) time.
    """
    variants = results.setdefault("floor_variants", {})
    for index, threads in enumerate(thread_counts):
        measured = bench_floor(dataset, cache_dir, first_rounds if index == 0 else other_rounds, threads)
        variant = variants.setdefault(f"threads={threads}", {"torch_threads": measured["torch_threads"], "passes": []})
        variant["passes"].append(measured)
        rows = [row for one in variant["passes"] for row in one["rounds"]]
        variant.update(
            round_s=round(statistics.median(r["seconds"] for r in rows), 3),
            round_min_s=min(r["seconds"] for r in rows),
            round_cpu_s=round(statistics.median(r["cpu_s"] for r in rows), 3),
            rounds_measured=len(rows),
            final_central_accuracy=variant["passes"][0]["final_central_accuracy"],
            accuracy_after_rounds=len(variant["passes"][0]["rounds"]),
            train_images_per_s=round(statistics.median(one["train_images_per_s"] for one in variant["passes"])),
            load_before=variant["passes"][0]["load_before"],
            load_after=measured["load_after"],
        )
    results["floor"] = min(variants.values(), key=lambda v: v["round_min_s"])


# --------------------------------------------------------------------------- (2) the per-sample PIL path


def bench_pil(dataset: str, rounds: int) -> dict[str, Any]:
    """quickstart-pytorch's data path: FederatedDataset, with_transform(ToTensor, Normalize), DataLoader."""
    wait_for_quiet("bench_pil")
    import torch
    from flwr_datasets import FederatedDataset
    from flwr_datasets.partitioner import IidPartitioner
    from torch.utils.data import DataLoader
    from torchvision.transforms import Compose, Normalize, ToTensor

    from fedcifar_app.model import Net, new_model

    config = default_run_config(dataset)
    transforms = Compose([ToTensor(), Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])

    def apply_transforms(batch: dict) -> dict:
        batch["img"] = [transforms(img) for img in batch["img"]]
        return batch

    started = time.perf_counter()
    fds = FederatedDataset(dataset=dataset, partitioners={"train": IidPartitioner(num_partitions=10)})
    test_loader = DataLoader(fds.load_split("test").with_transform(apply_transforms), batch_size=32)
    setup_s = time.perf_counter() - started

    def train(net, loader) -> None:
        optimizer = torch.optim.Adam(net.parameters(), lr=config.learning_rate)
        criterion = torch.nn.CrossEntropyLoss()
        net.train()
        for batch in loader:
            optimizer.zero_grad()
            criterion(net(batch["img"]), batch["label"]).backward()
            optimizer.step()

    @torch.no_grad()
    def test(net, loader) -> float:
        net.eval()
        correct = total = 0
        for batch in loader:
            correct += (net(batch["img"]).argmax(1) == batch["label"]).sum().item()
            total += len(batch["label"])
        return correct / total

    weights = new_model(0).state_dict()
    rows = []
    result: dict[str, Any] = {"load_before": load_average(), "setup_s": round(setup_s, 3)}
    for server_round in range(1, rounds + 1):
        started = time.perf_counter()
        updates, loaders = [], {}
        for pid in range(10):
            split = fds.load_partition(pid).train_test_split(test_size=config.val_fraction, seed=config.seed)
            split = split.with_transform(apply_transforms)
            loaders[pid] = DataLoader(split["test"], batch_size=32)
            local = Net()
            local.load_state_dict(weights)
            train(local, DataLoader(split["train"], batch_size=config.batch_size, shuffle=True))
            updates.append(({k: v.detach().clone() for k, v in local.state_dict().items()}, len(split["train"])))
        weights = fedavg(updates)
        trained = time.perf_counter()
        model = Net()
        model.load_state_dict(weights)
        for pid in random.Random(server_round).sample(range(10), 5):
            test(model, loaders[pid])
        accuracy = test(model, test_loader)
        ended = time.perf_counter()
        rows.append(
            {
                "round": server_round,
                "seconds": round(ended - started, 3),
                "train_s": round(trained - started, 3),
                "central_accuracy": round(accuracy, 4),
            }
        )
        log(f"PIL path round {server_round}: {rows[-1]['seconds']:.2f}s (train {rows[-1]['train_s']:.2f}s)")
    result.update(
        rounds=rows, round_s=round(statistics.median(r["seconds"] for r in rows), 3), load_after=load_average()
    )
    return result


# --------------------------------------------------------------------------- (3) the real `flwr run .`


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, session id) for every process we can read."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()
            table[int(entry.name)] = (int(fields[1]), int(fields[3]))
        except (OSError, IndexError, ValueError):
            continue
    return table


def process_tree(root: int) -> set[int]:
    """``root``, its descendants, and anything else in its session (Ray daemons, actors)."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    tree, stack = set(), [root]
    while stack:
        pid = stack.pop()
        if pid in tree:
            continue
        tree.add(pid)
        stack.extend(children.get(pid, []))
    tree |= {pid for pid, (_, sid) in table.items() if sid == root}
    return tree


def _memory_kb(pid: int, field: str, path: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/{path}").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


class TreeMonitor:
    """Polls the run's process tree: peak summed RSS, and summed PSS (shared pages split) at peaks."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.peak_rss_kb = 0
        self.peak_pss_kb = 0
        self.peak_processes = 0
        self.seen: set[int] = set()
        self.at_peak: list[dict[str, Any]] = []
        self.cpu_ticks: dict[int, int] = {}  # pid -> utime + stime at its last poll
        self.names: dict[int, str] = {}
        self._last_pss = 0.0

    def cpu_by_process(self, top: int = 8) -> list[dict[str, Any]]:
        """Where the CPU went so far: the busiest processes."""
        tick = os.sysconf("SC_CLK_TCK")
        rows = sorted(self.cpu_ticks.items(), key=lambda item: -item[1])[:top]
        return [{"pid": pid, "name": self.names.get(pid, "?"), "cpu_s": round(t / tick, 1)} for pid, t in rows]

    def cpu_s(self) -> float:
        """CPU seconds the run's processes have used so far (user + system, all threads)."""
        return sum(self.cpu_ticks.values()) / os.sysconf("SC_CLK_TCK")

    def poll(self) -> None:
        pids = process_tree(self.root)
        self.seen |= pids
        for pid in pids:
            ticks = _cpu_ticks(pid)
            if ticks is not None:
                self.cpu_ticks[pid] = ticks
            if pid not in self.names:
                self.names[pid] = _name(pid)
        rss_of = {pid: _memory_kb(pid, "VmRSS:", "status") for pid in pids}
        rss = sum(rss_of.values())
        self.peak_processes = max(self.peak_processes, len(pids))
        now = time.monotonic()
        if rss > self.peak_rss_kb or now - self._last_pss > 2.0:
            self._last_pss = now
            pss_of = {pid: _memory_kb(pid, "Pss:", "smaps_rollup") for pid in pids}
            if sum(pss_of.values()) > self.peak_pss_kb:
                self.peak_pss_kb = sum(pss_of.values())
                # Where the memory is at the peak: the biggest processes by PSS.
                self.at_peak = sorted(
                    (
                        {"pid": pid, "name": _name(pid), "rss_mb": rss_of[pid] // 1024, "pss_mb": pss_of[pid] // 1024}
                        for pid in pids
                    ),
                    key=lambda row: -row["pss_mb"],
                )[:12]
        self.peak_rss_kb = max(self.peak_rss_kb, rss)


def _cpu_ticks(pid: int) -> int | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime, stime
    except (OSError, IndexError, ValueError):
        return None


def _name(pid: int) -> str:
    """A short name: the script or module a Python process runs, else the command."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    words = [a.decode(errors="replace") for a in argv if a]
    if not words:
        return _state(pid)
    for word in words[1:3]:
        if word.endswith(".py") or word.startswith("ray::") or "/bin/" in word:
            return Path(word).name
    return Path(words[0]).name[:40]


APP_DIR = {"path": REPO}  # --app: the Flower app folder `flwr run` runs (a modified copy, for experiments)


def run_flwr(
    label: str,
    cache_dir: Path,
    run_config: dict[str, str],
    federation_config: str | None,
    timeout_s: float,
    workdir: Path,
) -> dict[str, Any]:
    """`flwr run .` in its own session; returns timings, memory and the run's metrics."""
    out_dir = workdir / f"out-{label}"
    shutil.rmtree(out_dir, ignore_errors=True)  # the run folder found afterwards must be this run's
    log_path = workdir / f"{label}.log"
    pairs = " ".join(f"{k}={v}" for k, v in {**run_config, "output-dir": repr(str(out_dir))}.items())
    command = ["flwr", "run", ".", "--run-config", pairs]
    if federation_config:
        command += ["--federation-config", federation_config]
    env = {**os.environ, "FEDCIFAR_CACHE_DIR": str(cache_dir), "PYTHONUNBUFFERED": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    wait_for_quiet(label)
    log(f"{label}: {shlex.join(command)}")
    stamps: list[tuple[float, str]] = []
    load_before = load_average()
    started = time.time()
    process = subprocess.Popen(
        command,
        cwd=APP_DIR["path"],
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
        if time.time() - started > timeout_s:
            timed_out = True
            _end_tree(process.pid, monitor.seen)
            break
        time.sleep(POLL_S)
    process.wait()
    exited = time.time()
    reader.join(timeout=10)
    _end_tree(process.pid, monitor.seen)  # anything the run left behind (it should leave nothing)
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


def _end_tree(root: int, seen: Iterable[int]) -> None:
    """End the run's session, then any process of its tree still alive, by pid."""
    try:
        os.killpg(root, signal.SIGTERM)
    except ProcessLookupError:
        pass
    alive = [pid for pid in set(seen) | process_tree(root) if Path(f"/proc/{pid}").exists()]
    deadline = time.time() + 10
    while alive and time.time() < deadline:
        time.sleep(0.2)
        alive = [pid for pid in alive if Path(f"/proc/{pid}").exists() and _state(pid) != "Z"]
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "-"


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


# --------------------------------------------------------------------------- (5) scale


def bench_partition_scale(dataset: str, cache_dir: Path, num_partitions: int) -> dict[str, Any]:
    """Partitioning the train split ``num_partitions`` ways, and every node's data, in one process."""
    from fedcifar_app import data
    from fedcifar_app.config import NodeData

    os.environ["FEDCIFAR_CACHE_DIR"] = str(cache_dir)
    config = default_run_config(dataset)
    data.reset_process_caches()
    started = time.perf_counter()
    data.load_node_data(config, NodeData(partition_id=0, num_partitions=num_partitions))
    first = time.perf_counter() - started
    for pid in range(1, num_partitions):
        data.load_node_data(config, NodeData(partition_id=pid, num_partitions=num_partitions))
    return {
        "num_partitions": num_partitions,
        "partitioner_and_first_node_s": round(first, 3),
        "all_nodes_s": round(time.perf_counter() - started, 3),
    }


# --------------------------------------------------------------------------- report


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    """Ratios and goals. The floor is the best round any single-process variant achieved (noise on a
    shared machine only adds time, so the minimum is the floor); flwr figures use the best warm run.
    Both sides take their best, so the ratios are like for like; the medians are kept beside them."""
    variants = results.get("floor_variants", {})
    floor_variant = results.get("floor", {})
    floor = floor_variant.get("round_min_s")
    rounds = results.get("rounds", 5)
    one_thread_cpu = variants.get("threads=1", {}).get("round_cpu_s")
    summary: dict[str, Any] = {
        "floor_round_s": floor,
        "floor_torch_threads": floor_variant.get("torch_threads"),
        "floor_round_median_s": min((v["round_s"] for v in variants.values()), default=None),
        "one_thread_floor_round_cpu_s": one_thread_cpu,
    }
    if "pil" in results:
        summary["pil_round_s"] = results["pil"]["round_s"]
        summary["pil_vs_floor"] = ratio(results["pil"]["round_s"], floor)
    runs = {"flwr_cold": results.get("flwr_cold"), "flwr_scale": results.get("flwr_scale")}
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
    cold, scale = results.get("flwr_cold") or {}, results.get("flwr_scale") or {}
    warm_runs = [r for r in results.get("flwr_warm_runs", []) if r.get("status") == "completed"]
    goals = {}
    if warm.get("steady_round_s") and floor:
        goals[f"steady rounds (3-5) <= 1.1 x floor: {ratio(warm['steady_round_s'], floor):.2f}"] = (
            ratio(warm["steady_round_s"], floor) <= GOALS["steady_round_vs_floor"]
        )
        goals[
            f"whole run (command start to exit) <= 1.4 x (5 x floor), warm: {ratio(warm['wall_s'], rounds * floor):.2f}"
        ] = ratio(warm["wall_s"], rounds * floor) <= GOALS["whole_run_vs_5_floors_warm"]
        best_startup = min(r["startup_to_round1_s"] for r in warm_runs)
        goals[f"start-up to round 1 <= 6 s, warm (best {best_startup:.1f} s)"] = best_startup <= GOALS["startup_warm_s"]
        goals[f"round-5 central accuracy >= 0.41: {warm.get('final_central_accuracy')}"] = (
            warm.get("final_central_accuracy") or 0
        ) >= GOALS["final_central_accuracy"]
    if cold.get("run_to_completed_s") and floor:
        goals[
            f"whole run (command start to exit) <= 1.5 x (5 x floor), cold: {ratio(cold['wall_s'], rounds * floor):.2f}"
        ] = ratio(cold["wall_s"], rounds * floor) <= GOALS["whole_run_vs_5_floors_cold"]
    measured = [r for r in [cold, *warm_runs] if r.get("peak_rss_gb")]
    if measured:
        pss, rss = max(r["peak_pss_gb"] for r in measured), max(r["peak_rss_gb"] for r in measured)
        summary["peak_pss_gb"], summary["peak_rss_gb"] = pss, rss
        goals[f"peak memory <= 3 GB, summed PSS (shared pages once): {pss:.2f}"] = pss <= GOALS["peak_memory_gb"]
        goals[f"peak memory <= 3 GB, summed RSS (shared pages per process): {rss:.2f}"] = rss <= GOALS["peak_memory_gb"]
    if scale.get("steady_round_s") and warm.get("steady_round_s"):
        summary["scale_vs_10_nodes"] = ratio(scale["steady_round_s"], warm["steady_round_s"])
        goals[f"1,000 nodes: round <= 1.5 x 10-node round: {summary['scale_vs_10_nodes']:.2f}"] = (
            summary["scale_vs_10_nodes"] <= GOALS["scale_round_vs_10_nodes"]
        )
    summary["goals_met"] = goals
    return summary


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
        chosen = " = floor" if variant.get("torch_threads") == results.get("floor", {}).get("torch_threads") else ""
        name = f"(1) 1 process, {variant['torch_threads']} thread(s), {variant['rounds_measured']} rounds{chosen}"
        best = variant["round_min_s"]
        lines.append(
            f"| {name:44s} | {best:6.2f} ({variant['round_s']:5.2f}) | {fmt(ratio(best, floor)):>7s} | "
            f"{variant['round_cpu_s']:11.2f} | {'':>10s} | {f'{rounds} x {best:.2f}':>16s} | "
            f"{fmt(ratio(best, floor)):>10s} | {'':>17s} | "
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
    rows.append(
        (f"(5) {results.get('scale_nodes', 1000):,} nodes, fraction-train 0.01, warm", results.get("flwr_scale"))
    )
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
    if "scale" in results:
        sc = results["scale"]
        lines.append(
            f"partitioning {sc['num_partitions']:,} ways (one process): partitioner + first node "
            f"{sc['partitioner_and_first_node_s']:.2f}s, all {sc['num_partitions']:,} nodes {sc['all_nodes_s']:.2f}s"
        )
    lines.append(
        "s/round: floor = best round (median in brackets); flwr = mean of rounds 3-5 (metrics.json 'seconds'). "
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dataset",
        default=str(DEFAULT_DATASET) if DEFAULT_DATASET.exists() else None,
        help=f"CIFAR-10 folder (default {DEFAULT_DATASET} when it exists)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results (default benchmarks/results.json)")
    parser.add_argument("--only", nargs="+", choices=STEPS, default=list(STEPS), help="steps to run (default all)")
    parser.add_argument(
        "--floor-rounds",
        type=int,
        default=5,
        help="rounds of the first floor variant, from the initial model (default 5: its accuracy is compared)",
    )
    parser.add_argument("--other-floor-rounds", type=int, default=2, help="rounds of the other variants (default 2)")
    parser.add_argument(
        "--floor-threads",
        type=int,
        nargs="+",
        default=None,
        help="torch thread counts to run the floor with (default: 1, then torch's default); the faster is the floor",
    )
    parser.add_argument("--pil-rounds", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5, help="num-server-rounds of the flwr runs (default 5)")
    parser.add_argument("--warm-runs", type=int, default=2, help="warm-cache flwr runs; the best counts (default 2)")
    parser.add_argument("--federation-config", default=None, help="passed to every `flwr run` (e.g. num-cpus)")
    parser.add_argument("--scale-nodes", type=int, default=1000)
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per flwr run before it is ended")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, run folders, cache)")
    parser.add_argument(
        "--quiet-load",
        type=float,
        default=0.0,
        help="before each timed step wait until the 1-min load average is below this (0: don't)",
    )
    parser.add_argument("--quiet-wait", type=float, default=300, help="longest wait for quiet, seconds")
    parser.add_argument(
        "--app",
        type=Path,
        default=REPO,
        help="Flower app folder for the flwr runs (default: this checkout); e.g. a copy with another pyproject.toml",
    )
    parser.add_argument(
        "--report",
        type=Path,
        default=None,
        help="only re-summarise and print an existing results JSON (and rewrite its summary)",
    )
    args = parser.parse_args(argv)
    if args.report:
        results = json.loads(args.report.read_text())
        results["summary"] = summarise(results)
        args.report.write_text(json.dumps(results, indent=2) + "\n")
        print_table(results)
        return 0
    if args.floor_threads is None:
        import torch

        args.floor_threads = sorted({torch.get_num_threads(), 1})  # 1 thread first: it has the 5 rounds
    if not args.dataset or not Path(args.dataset).is_dir():
        parser.error(f"--dataset: no such folder ({args.dataset}); pass the CIFAR-10 parquet folder")
    dataset = str(Path(args.dataset).resolve())
    if shutil.which("flwr", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}") is None and {
        "flwr",
        "scale",
    } & set(args.only):
        parser.error("`flwr` is not on PATH: activate the project's virtual environment")

    QUIET.update(load=args.quiet_load, max_wait_s=args.quiet_wait)
    APP_DIR["path"] = args.app.resolve()
    workdir = Path(tempfile.mkdtemp(prefix="fedcifar-bench-"))
    bench_cache = workdir / "cache-bench"  # the floor's and the data step's own cache
    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "dataset": dataset,
        "argv": sys.argv[1:],
        "machine": machine(),
        "federation_config": args.federation_config,
        "workdir": str(workdir),
        "app": str(APP_DIR["path"]),
        "rounds": args.rounds,
        "scale_nodes": args.scale_nodes,
    }
    log(f"working folder {workdir}; load average {load_average()}")
    try:
        if "data" in args.only or "floor" in args.only or "scale" in args.only:
            results["data"] = bench_data(dataset, bench_cache)
            log(f"data: {json.dumps(results['data'])}")
        floor_pass = functools.partial(add_floor_rounds, results, dataset, bench_cache, args.floor_threads)
        if "floor" in args.only:
            floor_pass(first_rounds=args.floor_rounds, other_rounds=args.other_floor_rounds)
        if "pil" in args.only:
            if "floor" in results:  # the same torch threads as the floor it is compared with
                import torch

                torch.set_num_threads(results["floor"]["torch_threads"])
            results["pil"] = bench_pil(dataset, args.pil_rounds)
        run_config = {"dataset": repr(dataset), "num-server-rounds": str(args.rounds)}
        if "flwr" in args.only:
            flwr_cache = workdir / "cache-flwr"  # fresh: the first run decodes, the second finds it
            federation = federation_config(args.federation_config) if args.federation_config else None
            results["flwr_cold"] = run_flwr("flwr_cold", flwr_cache, run_config, federation, args.timeout, workdir)
            log(f"flwr cold: {_brief(results['flwr_cold'])}")
            if "floor" in args.only:  # the machine is shared: floor rounds between the runs follow its load
                floor_pass(first_rounds=1, other_rounds=1)
            warm_runs = results["flwr_warm_runs"] = []
            for index in range(1, args.warm_runs + 1):
                warm_runs.append(
                    run_flwr(f"flwr_warm_{index}", flwr_cache, run_config, federation, args.timeout, workdir)
                )
                log(f"flwr warm {index}: {_brief(warm_runs[-1])}")
                if "floor" in args.only:
                    floor_pass(first_rounds=1, other_rounds=1)
            completed = [r for r in warm_runs if r.get("status") == "completed"] or warm_runs
            results["flwr_warm"] = min(completed, key=lambda r: r.get("wall_s") or 1e9)
        if "scale" in args.only:
            results["scale"] = bench_partition_scale(dataset, bench_cache, args.scale_nodes)
            log(f"partitioning: {results['scale']}")
            scale_config = {
                **run_config,
                "fraction-train": "0.01",
                "fraction-evaluate": "0.005",
                "min-train-nodes": "10",
                "min-evaluate-nodes": "5",
                "min-available-nodes": str(args.scale_nodes),
            }
            federation = federation_config(args.federation_config, **{"num-supernodes": args.scale_nodes})
            results["flwr_scale"] = run_flwr("flwr_scale", bench_cache, scale_config, federation, args.timeout, workdir)
            log(f"flwr scale: {_brief(results['flwr_scale'])}")
    finally:
        results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        results["summary"] = summarise(results)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        if not args.keep:
            for path in workdir.glob("cache-*"):
                shutil.rmtree(path, ignore_errors=True)
    print_table(results)
    log(f"results: {args.out}; logs and run folders: {workdir}")
    return 0


def _brief(run: dict[str, Any]) -> str:
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


if __name__ == "__main__":
    sys.exit(main())
