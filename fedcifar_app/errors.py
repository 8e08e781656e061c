"""Every error a user can act on, in one place. Each message names the problem and the fix in one
line; the ServerApp prints it as the run's single ERROR line and records it in status.json, and the
console scripts print a bad command line or config as ``<prog>: error: <message>`` with exit status 2
(a deployment step that failed, ``DeployError``: ``fedcifar-deploy: <message>``, exit status 1).
Torch-free, Flower-free."""

from __future__ import annotations


class ConfigError(ValueError):
    """A run-config or node-config value that cannot be used."""


class UsageError(ValueError):
    """A command line or pyproject.toml that cannot be used."""


class DataError(ValueError):
    """Data that cannot be used; the message names the file or key."""


class DeployError(RuntimeError):
    """A deployment step that failed (fedcifar-deploy): what went wrong and which log to read."""


class WarmStartError(RuntimeError):
    """The warm ClientApp start cannot be set up (its folder, its console scripts); --cold runs without it."""


class RunAborted(RuntimeError):
    """The run cannot go on (too few nodes or replies, training diverged); the message says why and what to do."""


class RunFolderUnwritable(RunAborted):
    """A file of the run folder could not be written (a full disk, a quota, a read-only file system, the
    folder deleted): the run ends; what it wrote before stays whole. The message is the problem, then the
    remedy, which ends with ``resume_command`` (the command that continues from the last checkpoint)."""

    def __init__(self, file_name: str, problem: str, remedy: str, resume_command: str | None = None) -> None:
        super().__init__(f"{problem}. {remedy}")
        self.file_name, self.problem, self.remedy, self.resume_command = file_name, problem, remedy, resume_command

    def with_note(self, note: str) -> str:
        """The message with ``note`` added to the problem, so the command to copy stays at the end."""
        return f"{self.problem}{note}. {self.remedy}"


class TrainingDiverged(RunAborted):
    """A loss or weight became NaN/inf: the round is not recorded and the last finite checkpoint stays."""


class RunStopped(Exception):
    """Someone stopped the run (Ctrl-C, SIGTERM, `flwr stop`); the message says who. Not a failure:
    status "stopped" was recorded when the stop came, and the last finished round can be resumed."""


def first_line(err: BaseException, limit: int = 200) -> str:
    """``err``'s message cut to its first non-empty line (its type name when it has none), for a
    one-line report of a third-party exception whose text may run over many lines."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
