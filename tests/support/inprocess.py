"""A real Flower simulation inside the test process: Flower's own engine, no Ray.

``run_inprocess`` starts Flower 1.25's simulation engine (``_run_simulation``: the real
InMemoryGrid, message queues, node contexts fused from this app's pyproject.toml with the
run-config overrides, exactly as ``flwr run`` does) with the real ServerApp and ClientApp.
Only the backend differs: ``InThreadBackend`` runs each ClientApp call in an engine worker
thread instead of a Ray actor, so a 2-round 3-node synthetic run takes seconds, not ~20 s.
It touches Flower internals (pinned 1.25) on purpose and lives in tests only; at least one
real ``flwr run .`` per feature still proves the production path.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.client_app import ClientAppException
from flwr.common.config import get_fused_config_from_dir
from flwr.common.telemetry import EventType
from flwr.common.typing import Run
from flwr.server.superlink.fleet.vce.backend import Backend, supported_backends
from flwr.serverapp import Grid, ServerApp
from flwr.simulation.run_simulation import _run_simulation
from flwr.supercore.constant import NOOP_FEDERATION

from support.flwr_run import PROJECT

BACKEND_NAME = "in-thread"


class InThreadBackend(Backend):
    """Runs the ClientApp in the engine's worker thread: one message at a time, same process."""

    def __init__(self, backend_config: Mapping[str, Any]) -> None:
        self.app_fn: Callable[[], ClientApp] | None = None

    def build(self, app_fn: Callable[[], ClientApp]) -> None:
        self.app_fn = app_fn

    @property
    def num_workers(self) -> int:
        return 1

    def is_worker_idle(self) -> bool:
        return True

    def terminate(self) -> None:
        self.app_fn = None

    def process_message(self, message: Message, context: Context) -> tuple[Message, Context]:
        assert self.app_fn is not None, "build() first"
        try:
            return self.app_fn()(message=message, context=context), context
        except Exception as err:  # what Ray's actor does: the engine turns it into an error reply
            raise ClientAppException(str(err)) from err


def run_inprocess(overrides: Mapping[str, Any], *, num_supernodes: int = 3, app_dir: Path = PROJECT) -> Path:
    """Run the app with ``overrides`` (run-config keys) and return the run folder it wrote.

    ``overrides`` must set ``output-dir`` to a fresh folder; the newest run folder in it is returned.
    """
    from fedcifar_app.client.app import app as client_app
    from fedcifar_app.server.app import main as server_main

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    supported_backends[BACKEND_NAME] = InThreadBackend
    overrides = dict(overrides)
    output_dir = Path(overrides["output-dir"])
    before = set(output_dir.iterdir()) if output_dir.exists() else set()
    run = Run.create_empty(run_id=random.getrandbits(63))
    run.override_config = overrides
    run.federation = NOOP_FEDERATION
    context = Context(
        run_id=run.run_id,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config=get_fused_config_from_dir(app_dir, overrides),
    )
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        """The app's own main, once the engine has registered the nodes.

        Flower 1.25 starts the ServerApp thread before the engine registers the SuperNodes;
        under `flwr run` the app's imports take long enough, here the app is already imported.
        """
        deadline = time.monotonic() + 30
        while len(grid.get_node_ids()) < num_supernodes and time.monotonic() < deadline:
            time.sleep(0.02)
        server_main(grid, context)

    _run_simulation(
        num_supernodes=num_supernodes,
        exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
        client_app=client_app,
        server_app=server_app,
        backend_name=BACKEND_NAME,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {}},
        server_app_context=context,
        app_dir=str(app_dir),
        run=run,
        is_app=True,
    )
    new = sorted(set(output_dir.iterdir()) - before)
    assert new, f"the ServerApp wrote no run folder under {output_dir}"
    return new[-1]
