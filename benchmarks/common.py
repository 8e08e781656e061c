"""What every benchmark step shares: the machine's description, logging, waiting for a quiet
machine, and the app's own run config and federation options (so the benchmark follows the app)."""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing


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


@dataclass(frozen=True)
class Quiet:
    """--quiet-load / --quiet-wait: on a shared machine, wait (bounded) before each timed step
    until the 1-minute load average drops below ``load`` (0: don't wait)."""

    load: float = 0.0
    max_wait_s: float = 0.0

    def wait(self, step: str) -> None:
        if not self.load:
            return
        started = time.monotonic()
        while os.getloadavg()[0] > self.load and time.monotonic() - started < self.max_wait_s:
            time.sleep(5)
        log(f"{step}: load average {load_average()} after waiting {time.monotonic() - started:.0f}s for quiet")


def default_run_config(dataset: str):
    """The app's run config from pyproject.toml, with ``dataset`` overridden (so the floor follows the app)."""
    from fedcifar_app.config import RunConfig
    from fedcifar_app.pyproject import app_run_config

    return RunConfig.from_run_config({**app_run_config(REPO), "dataset": dataset})


def federation_config(app_dir: Path, overrides: str | None = None, **options: Any) -> str:
    """The default federation's whole ``options`` table as ``--federation-config`` pairs, with overrides.

    Flower 1.25's ``--federation-config`` replaces the whole ``options`` table when given any
    ``options.*`` key, so ``"options.num-supernodes=1000"`` alone would silently drop
    ``client-resources`` and ``init-args``; ``pyproject.federation_override`` restates every key.
    ``overrides`` is ``--federation-config`` text (``"options.backend.client-resources.num-cpus=2"``).
    """
    from fedcifar_app.pyproject import federation_override, parse_overrides

    changes = {key.removeprefix("options."): value for key, value in parse_overrides(overrides or "").items()}
    changes.update(options)
    return federation_override(app_dir, changes)
