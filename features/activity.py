"""How recently and how much a user connects: decayed counts of their current connections.

activity_τ(user, t) = Σ over the user's alive connections e of exp(−(t − ts_e)/τ), ts_e the time the
connection was (last) added, one value per time constant τ in :data:`TIME_CONSTANTS_MS` (a day, a week, a
month). It is a function of the user's edge registers only, so it is exact and idempotent like every other
feature (duplicates and out-of-order events change nothing), and it travels as (values at an anchor time,
anchor): values·exp(−(t − anchor)/τ) is the same sum at any t. The sums use ``math.fsum`` (exactly rounded,
independent of the order of the edges), so every holder of the same edges computes the same bits.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

DAY_MS = 86_400_000
TIME_CONSTANTS_MS: tuple[int, ...] = (DAY_MS, 7 * DAY_MS, 30 * DAY_MS)


def activity_values(edge_ts: Iterable[int], anchor_ms: int) -> tuple[float, ...]:
    """The decayed counts at ``anchor_ms`` of connections added at ``edge_ts``."""
    stamps = list(edge_ts)
    return tuple(math.fsum(math.exp(-(anchor_ms - ts) / tau) for ts in stamps) for tau in TIME_CONSTANTS_MS)


def activity_at(values: Sequence[float], anchor_ms: int, as_of_ms: int) -> tuple[float, ...]:
    """The decayed counts at ``as_of_ms`` from their values at ``anchor_ms``."""
    return tuple(value * math.exp(-(as_of_ms - anchor_ms) / tau)
                 for value, tau in zip(values, TIME_CONSTANTS_MS, strict=True))
