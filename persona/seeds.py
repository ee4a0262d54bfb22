"""One rule for every seed the pipeline derives from `seed`."""
from __future__ import annotations

import hashlib


def derive_seed(seed: int, *parts: int | str) -> int:
    """The seed of one use of the run's `seed` (a batch, a step on a process, a split...).

    Distinct parts give independent streams, stable across processes and Python runs (unlike
    `hash()`), and the value fits every RNG here (below 2**31).
    """
    digest = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:4], "big") >> 1
