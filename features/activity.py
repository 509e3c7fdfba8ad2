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

import numpy as np

DAY_MS = 86_400_000
TIME_CONSTANTS_MS: tuple[int, ...] = (DAY_MS, 7 * DAY_MS, 30 * DAY_MS)


def activity_values(edge_ts: Iterable[int], anchor_ms: int) -> tuple[float, ...]:
    """The decayed counts at ``anchor_ms`` of connections added at ``edge_ts``."""
    stamps = list(edge_ts)
    return tuple(math.fsum(math.exp(-(anchor_ms - ts) / tau) for ts in stamps) for tau in TIME_CONSTANTS_MS)


def activity_at(values: Sequence[float], anchor_ms: int, as_of_ms: int) -> tuple[float, ...]:
    """The decayed counts at ``as_of_ms`` from their values at ``anchor_ms``. An as-of time before the anchor
    (another partition's user whose events run ahead of this partition's event time) reads the values at the
    anchor: growing them back in time would be meaningless, and overflows for large gaps."""
    elapsed = max(0, as_of_ms - anchor_ms)
    return tuple(value * math.exp(-elapsed / tau) for value, tau in zip(values, TIME_CONSTANTS_MS, strict=True))


WEEKLY = 1  # index of the 7-day time constant: the "most active users" order


def activity_rank_key(values: Sequence[float], anchor_ms: int) -> float:
    """An order key of the weekly activity that does not depend on the time it is read at: every reading
    a·exp(−(t − anchor)/τ) at a common t ranks users as log a + anchor/τ does. −inf without activity."""
    weekly = values[WEEKLY] if len(values) > WEEKLY else 0.0
    return math.log(weekly) + anchor_ms / TIME_CONSTANTS_MS[WEEKLY] if weekly > 0 else -math.inf


class ActivityLeaderboard:
    """Every user's weekly-activity key and degree in flat arrays, for "the k most active users" (the
    ``popular`` Stage 1 source) in one vectorised pass: O(1) per update, O(users) per query, no sort of the
    whole population. Order: key desc, then degree desc, then id asc; users without activity are left out."""

    def __init__(self) -> None:
        self._slot: dict[int, int] = {}
        self._ids = np.zeros(1024, np.int64)
        self._keys = np.full(1024, -math.inf)
        self._degrees = np.zeros(1024, np.int64)
        self._version = 0
        self._cached: tuple[int, int, list[int]] | None = None  # (version, k, answer)

    def __len__(self) -> int:
        return len(self._slot)

    def update(self, user: int, values: Sequence[float], anchor_ms: int, degree: int) -> None:
        slot = self._slot.get(user)
        if slot is None:
            slot = self._slot[user] = len(self._slot)
            if slot == len(self._ids):
                grow = len(self._ids)
                self._ids = np.concatenate([self._ids, np.zeros(grow, np.int64)])
                self._keys = np.concatenate([self._keys, np.full(grow, -math.inf)])
                self._degrees = np.concatenate([self._degrees, np.zeros(grow, np.int64)])
            self._ids[slot] = user
        self._keys[slot] = activity_rank_key(values, anchor_ms)
        self._degrees[slot] = degree
        self._version += 1

    def top(self, k: int) -> list[int]:
        """The k most active users, best first."""
        cached = self._cached
        if cached is not None and cached[0] == self._version and cached[1] >= k:
            return cached[2][:k]
        n = len(self._slot)
        keys = self._keys[:n]
        if k <= 0 or n == 0:
            return []
        if k < n:  # everything at or above the k-th largest key (ties at the boundary included)
            threshold = np.partition(keys, n - k)[n - k]
            chosen = np.flatnonzero(keys >= threshold)
        else:
            chosen = np.arange(n)
        chosen = chosen[np.isfinite(keys[chosen])]
        order = np.lexsort((self._ids[chosen], -self._degrees[chosen], -keys[chosen]))
        answer = self._ids[chosen[order[:k]]].tolist()
        self._cached = (self._version, k, answer)
        return answer
