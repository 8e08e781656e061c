"""The recorder side of the strategy hooks, kept in memory: build and drive a strategy without a run folder."""

from __future__ import annotations

from collections.abc import Mapping


class MemoryRecorder:
    """A ``server.hooks.RoundSink`` like ``runs.recorder.RunRecorder``: rounds numbered from ``offset`` (a
    resumed run's), client metrics kept per round, and how many rounds began."""

    def __init__(self, offset: int = 0) -> None:
        self.offset, self.began = offset, 0
        self.metrics: dict[str, float] = {}

    def global_round(self, local_round: int) -> int:
        return local_round + self.offset

    def begin_round(self) -> None:
        self.began += 1
        self.metrics = {}

    def add_client_metrics(self, metrics: Mapping[str, float]) -> None:
        self.metrics.update(metrics)
