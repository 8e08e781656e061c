"""The few Flower internals this app touches, each with a fallback for the Flower versions we run on.

The pin is flwr 1.25 (its pyproject federations), but the app code must import and run on the
newest Flower too (1.42 is checked in CI). Anything below moved between releases; nothing
else in the package imports from ``flwr.server``, ``flwr.simulation`` or ``flwr.common.*``.
"""

from __future__ import annotations

from typing import Any

try:  # flwr <= 1.25
    from flwr.server.grid import InMemoryGrid as _InMemoryGrid
except ImportError:  # flwr >= 1.26 moved it
    try:
        from flwr.superlink.grid import InMemoryGrid as _InMemoryGrid
    except ImportError:  # pragma: no cover - a Flower without an in-memory grid
        _InMemoryGrid = None

try:  # flwr <= 1.25
    from flwr.common.constant import ErrorCode
except ImportError:  # pragma: no cover
    from flwr.app import ErrorCode  # type: ignore[no-redef]

try:
    from flwr.app import MessageType
except ImportError:  # pragma: no cover - flwr < 1.21
    from flwr.common.constant import MessageType  # type: ignore[no-redef]

try:
    from flwr.common.config import flatten_dict as _flatten_dict
except ImportError:  # pragma: no cover
    _flatten_dict = None

__all__ = ["ErrorCode", "MessageType", "flatten_dict", "is_simulation"]


def is_simulation(grid: Any) -> bool:
    """True when the ServerApp runs inside a simulation (every node registered up front).

    Flower 1.27+ runs simulations through a local SuperLink, so there the grid is the
    deployment one; callers treat that like a deployment (they wait for nodes), which is correct.
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
