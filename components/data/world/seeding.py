"""Independent random streams: one numpy Generator per (seed, purpose, index).

Seeding every product image and every click-log day from its own stream is what lets images be
drawn by any number of processes, and lets later days be appended, without changing any byte
that was already generated.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np


class Purpose(IntEnum):
    """What a random stream is used for; the value is part of the seed, so never renumber."""

    CATALOG = 1
    TITLE = 2
    IMAGE = 3
    QUERY = 4
    CLICKS = 5
    DRIFT = 6  # what an appended stretch of days changes


def rng_for(seed: int, purpose: Purpose, index: int = 0) -> np.random.Generator:
    """The random stream of one (seed, purpose, index); negative seeds are folded to 64 bits."""
    return np.random.default_rng([seed % 2**64, int(purpose), index])
