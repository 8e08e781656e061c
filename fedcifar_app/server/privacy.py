"""The privacy budget of a DP run: an RDP accountant over the rounds run so far. Flower-free.

Each round is one Gaussian mechanism on the mean of the sampled nodes' clipped updates (noise
standard deviation ``noise_multiplier * clipping_norm / nodes sampled``), applied to a
``sampling_rate`` share of the nodes. Composition over rounds and the conversion to
(epsilon, delta) are Google's ``dp_accounting`` (RDP), imported only when a DP run asks.
The history is a short list of numbers, so a checkpoint keeps it and a resumed run continues it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any


@dataclass
class PrivacyAccountant:
    """(noise multiplier, sampling rate, rounds) groups in the order they ran, and the delta to report at."""

    delta: float
    history: list[tuple[float, float, int]] = field(default_factory=list)

    def step(self, noise_multiplier: float, sampling_rate: float) -> None:
        """Account one more round."""
        if self.history and self.history[-1][:2] == (noise_multiplier, sampling_rate):
            noise, rate, rounds = self.history[-1]
            self.history[-1] = (noise, rate, rounds + 1)
        else:
            self.history.append((noise_multiplier, sampling_rate, 1))

    @property
    def rounds(self) -> int:
        return sum(rounds for _, _, rounds in self.history)

    def epsilon(self) -> float:
        """The epsilon spent so far at ``delta`` (0 before any round)."""
        if not self.history:
            return 0.0
        import dp_accounting
        from dp_accounting.rdp import rdp_privacy_accountant

        accountant = rdp_privacy_accountant.RdpAccountant()
        for noise, rate, rounds in self.history:
            event = dp_accounting.GaussianDpEvent(noise)
            if rate < 1.0:
                event = dp_accounting.PoissonSampledDpEvent(rate, event)
            accountant.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
        absl = logging.getLogger("absl")  # it warns per fractional RDP order it skips; the bound stays valid
        previous = absl.level
        absl.setLevel(logging.ERROR)
        try:
            return float(accountant.get_epsilon(self.delta))
        finally:
            absl.setLevel(previous)

    def to_state(self) -> dict[str, Any]:
        return {"delta": self.delta, "history": [[float(n), float(q), int(r)] for n, q, r in self.history]}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> PrivacyAccountant:
        return cls(delta=float(state["delta"]), history=[(float(n), float(q), int(r)) for n, q, r in state["history"]])
