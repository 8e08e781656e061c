"""Seeds that are the same in every process, so runs and resumed runs repeat exactly."""

from __future__ import annotations

import hashlib


def derive_seed(*parts: int | str) -> int:
    """A stable 63-bit seed from (seed, round, partition-id, ...).

    Python's ``hash`` is salted per process, so it cannot give reproducible runs across
    Ray workers or SuperNodes; a digest can.
    """
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1
