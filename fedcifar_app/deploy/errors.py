"""The one error type of fedcifar-deploy."""

from __future__ import annotations


class DeployError(RuntimeError):
    """A failure worth one line to the user: what went wrong and where to look."""
