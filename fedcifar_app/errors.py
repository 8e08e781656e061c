"""Errors a user can act on. Each message names the problem and the fix in one line; the
ServerApp prints it as the run's single ERROR line and records it in status.json."""

from __future__ import annotations


class DataError(ValueError):
    """Data that cannot be used; the message names the file or key and the fix."""


class RunAborted(RuntimeError):
    """The run cannot go on (too few nodes or replies, training diverged); the message says why and what to do."""


class TrainingDiverged(RunAborted):
    """A loss or weight became NaN/inf: the round is not recorded and the last finite checkpoint stays."""


class RunStopped(Exception):
    """Someone stopped the run (Ctrl-C, SIGTERM, `flwr stop`); the message says who. Not a failure:
    status "stopped" was recorded when the stop came, and the last finished round can be resumed."""
