"""The few Flower internals this app touches, each with a fallback for the Flower versions we run on.

The pin is flwr 1.25 (its pyproject federations), but the app code must import and run on the
newest Flower too (1.42 is checked in CI). Anything below moved between releases; nothing
else in the package imports from ``flwr.server``, ``flwr.simulation`` or ``flwr.common.*``.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any


def _from_first(name: str, *modules: str) -> Any:
    """``name`` from the first of ``modules`` that has it (Flower moved it between releases); None if none does."""
    for module in modules:
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    return None  # pragma: no cover - a Flower without it


class _NeverRaised(BaseException):
    """Stands in for an exception that a Flower without it never raises."""


if TYPE_CHECKING:  # the type checker reads the pinned Flower (1.25)
    from flwr.app import MessageType
    from flwr.common.constant import ErrorCode
    from flwr.common.typing import RunNotRunningException
else:  # at run time, wherever the installed Flower keeps them
    ErrorCode = _from_first("ErrorCode", "flwr.common.constant", "flwr.app")  # flwr <= 1.25, then newer
    MessageType = _from_first("MessageType", "flwr.app", "flwr.common.constant")  # flwr >= 1.21, then older
    # flwr <= 1.25, then >= 1.26 (1.42: flwr.supercore.run)
    RunNotRunningException = (
        _from_first("RunNotRunningException", "flwr.common.typing", "flwr.supercore.run") or _NeverRaised
    )
_InMemoryGrid = _from_first("InMemoryGrid", "flwr.server.grid", "flwr.superlink.grid")  # <= 1.25, >= 1.26
_flatten_dict = _from_first("flatten_dict", "flwr.common.config")
_add_exit_handler = _from_first("add_exit_handler", "flwr.common.exit", "flwr.supercore.exit")  # <= 1.25, 1.42


__all__ = [
    "ErrorCode",
    "MessageType",
    "RunNotRunningException",
    "add_exit_handler",
    "flatten_dict",
    "is_simulation",
    "simulation_engine_stop_event",
]


def add_exit_handler(handler: Callable[[], None]) -> bool:
    """Have Flower call ``handler`` when its own signal handler ends the process (flwr-serverapp, and
    flwr-simulation from 1.27 on): SIGINT/SIGTERM, or a heartbeat the SuperLink refused after ``flwr stop``.
    Handlers run last-registered first, before Flower's own clean-up. False where Flower has no such hook."""
    if _add_exit_handler is None:  # pragma: no cover
        return False
    _add_exit_handler(handler)
    return True


def simulation_engine_stop_event() -> threading.Event | None:
    """The stop event of Flower 1.25's ``flower-simulation`` engine, seen from the ServerApp thread.

    ``flower-simulation`` registers no exit handlers: Ctrl-C or SIGTERM raise in its main thread,
    which sets this event (the engine's workers stop) and then waits for the ServerApp thread.
    The event is handed to the ServerApp thread's target (``run_serverapp_th``'s ``f_stop``), so
    it is found among that thread's arguments. None elsewhere (deployment, Flower >= 1.27, a thread
    started another way): there ``add_exit_handler`` delivers the stop instead.
    """
    thread = threading.current_thread()
    if thread is threading.main_thread():
        return None
    target = getattr(thread, "_target", None)
    if getattr(target, "__name__", "") != "server_th_with_start_checks":
        return None
    found = [arg for arg in getattr(thread, "_args", ()) if isinstance(arg, threading.Event)]
    return found[0] if found else None  # f_stop comes before has_exception


def is_simulation(grid: Any) -> bool:
    """True when the ServerApp runs inside a simulation (every node registered up front).

    Flower 1.42's simulation runtime (behind its local SuperLink) still hands the ServerApp an
    InMemoryGrid, now from ``flwr.superlink.grid`` (the CI check prints "simulation"). A grid of
    another kind is treated as a deployment: the app then waits for nodes, which is always safe.
    """
    return _InMemoryGrid is not None and isinstance(grid, _InMemoryGrid)


def flatten_dict(table: dict[str, Any], parent_key: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``, as Flower flattens pyproject tables."""
    if _flatten_dict is not None:
        return dict(_flatten_dict(table, parent_key))
    flat: dict[str, Any] = {}  # pragma: no cover - same rule as Flower's
    for key, value in table.items():
        name = f"{parent_key}.{key}" if parent_key else key
        flat.update(flatten_dict(value, name) if isinstance(value, dict) else {name: value})
    return flat
