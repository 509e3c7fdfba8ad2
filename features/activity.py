"""How recently and how much a user connects: decayed counts of their current connections.

activity_τ(user, t) = Σ over the user's alive connections e of exp(−(t − ts_e)/τ), ts_e the time the
connection was (last) added, one value per time constant τ in :data:`TIME_CONSTANTS_MS` (a day, a week, a
month). It is a function of the user's edge registers only, so it is exact and idempotent like every other
feature (duplicates and out-of-order events change nothing), and it travels as (values at an anchor time,
anchor): values·exp(−(t − anchor)/τ) is the same sum at any t. The sums use ``math.fsum`` (exactly rounded,
independent of the order of the edges), so every holder of the same edges computes the same bits.
"""

from __future__ import annotations

import heapq
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
    ``popular`` Stage 1 source). Order: key desc, then degree desc, then id asc; users without activity are left
    out. O(1) per update.

    A query does not scan the population: the board keeps the *leaders*, every user whose key is at or above a
    threshold (the ``margin``·k-th largest key when it was last set), and answers from them alone, which is
    exact because every other user's key is below every leader's. Updates keep the set exact (a user is in it
    iff its key ≥ the threshold); a key only rises as its user connects (the anchor moves forward), so the
    set grows, and is cut back to its best ``margin``·k when it passes ``SLACK`` times that (a partition of the
    leaders only: the users outside stay below the raised threshold). It shrinks when a leader's key falls (a
    removed connection) or a query asks for more than it holds: then, and only then, one pass over every user
    sets a new threshold. A scan of 10⁸ keys per query would take a second; the leaders are a few hundred."""

    MARGIN = 2  # leaders kept at a reset: this many times the k asked (at least MIN_LEADERS)
    MIN_LEADERS = 256
    SLACK = 4  # the leaders are cut back to MARGIN·k when they are this many times that

    def __init__(self) -> None:
        self._slot: dict[int, int] = {}
        self._ids = np.zeros(1024, np.int64)
        self._keys = np.full(1024, -math.inf)
        self._degrees = np.zeros(1024, np.int64)
        self._versions = np.full(1024, -1, np.int64)  # of each user's latest record (update's version)
        self._version = 0
        self._cached: tuple[int, int, list[int]] | None = None  # (version, k, answer)
        # the leaders (slots) and their threshold; +inf: none chosen yet. At −inf the leaders are every user with
        # activity (fewer than asked at the last reset).
        self._threshold = math.inf
        self._leaders: set[int] = set()
        self._wanted = 0  # leaders to keep at a cut (MARGIN · the largest k asked)
        self.full_scans = 0  # passes over every user (tests, /stats)

    def __len__(self) -> int:
        return len(self._slot)

    def update(self, user: int, values: Sequence[float], anchor_ms: int, degree: int, version: int = -1) -> None:
        """``version``: of the record these come from; an update older than the one held is ignored (records
        arrive in any order)."""
        slot = self._slot.get(user)
        if slot is None:
            slot = self._slot[user] = len(self._slot)
            if slot == len(self._ids):
                grow = len(self._ids)
                self._ids = np.concatenate([self._ids, np.zeros(grow, np.int64)])
                self._keys = np.concatenate([self._keys, np.full(grow, -math.inf)])
                self._degrees = np.concatenate([self._degrees, np.zeros(grow, np.int64)])
                self._versions = np.concatenate([self._versions, np.full(grow, -1, np.int64)])
            self._ids[slot] = user
        elif version < self._versions[slot]:
            return
        self._versions[slot] = version
        key = activity_rank_key(values, anchor_ms)
        self._keys[slot] = key
        self._degrees[slot] = degree
        self._version += 1
        if key >= self._threshold and key > -math.inf:
            self._leaders.add(slot)
            if len(self._leaders) > self.SLACK * self._wanted:
                self._cut_leaders()
        else:
            self._leaders.discard(slot)

    def top(self, k: int) -> list[int]:
        """The k most active users, best first."""
        cached = self._cached
        if cached is not None and cached[0] == self._version and cached[1] >= k:
            return cached[2][:k]
        if k <= 0 or not self._slot:
            return []
        if len(self._leaders) < k and self._threshold > -math.inf:  # too few known to be ahead of the rest
            self._reset_leaders(k)
        chosen = np.fromiter(self._leaders, np.int64, len(self._leaders))
        keys = self._keys[chosen]
        if k < len(chosen):  # everything at or above the k-th largest key (ties at the boundary included)
            keep = keys >= np.partition(keys, len(chosen) - k)[len(chosen) - k]
            chosen, keys = chosen[keep], keys[keep]
        order = np.lexsort((self._ids[chosen], -self._degrees[chosen], -keys))
        answer = self._ids[chosen[order[:k]]].tolist()
        self._cached = (self._version, k, answer)
        return answer

    def _reset_leaders(self, k: int) -> None:
        """One pass over every user: the leaders become the users at or above the (MARGIN·k)-th largest key."""
        self.full_scans += 1
        self._wanted = max(self._wanted, self.MARGIN * k, self.MIN_LEADERS)
        n = len(self._slot)
        keys = self._keys[:n]
        at = n - self._wanted  # the threshold's position in ascending order; none when all are wanted
        threshold = float(np.partition(keys, at)[at]) if at > 0 else -math.inf
        chosen = np.flatnonzero((keys >= threshold) & (keys > -math.inf))
        self._threshold = threshold
        self._leaders = set(chosen.tolist())

    def _cut_leaders(self) -> None:
        """The leaders back to their best ``_wanted`` (ties at the new threshold kept): everyone dropped is below
        it, as everyone outside already was below the old one."""
        chosen = np.fromiter(self._leaders, np.int64, len(self._leaders))
        keys = self._keys[chosen]
        at = len(chosen) - self._wanted
        threshold = float(np.partition(keys, at)[at])
        self._threshold = threshold
        self._leaders = set(chosen[keys >= threshold].tolist())

    def top_entries(self, k: int) -> list[PopularEntry]:
        """:meth:`top` with each user's order key and degree (a partition's list, :class:`MergedTops`)."""
        slot = self._slot
        return [(user, float(self._keys[slot[user]]), int(self._degrees[slot[user]])) for user in self.top(k)]


PopularEntry = tuple[int, float, int]  # (user, weekly-activity order key, degree): ActivityLeaderboard's order


def _order(entry: PopularEntry) -> tuple[float, int, int]:
    return -entry[1], -entry[2], entry[0]


class MergedTops:
    """The most active users of the whole graph from each partition's top users, as their owners publish them
    (``PYMK_GLOBALS_MODE=reachable``: a worker then need not keep every user's activity): the k-way merge of the
    partitions' lists, each already in :class:`ActivityLeaderboard`'s order.

    Exact as far as it answers: a partition's list is either all its users with activity (``complete``) or its
    best ones, and then every user it left out comes after its last entry. So the merge is the global order up to
    the first entry that comes after some cut list's last one (the *limit*); a query for more than that gets the
    exact prefix only, and is counted (``answers_cut``). A user's global rank r is in its partition's list once
    that list holds more than the partition's share of the top r: lists of a few dozen cover the popular walk."""

    def __init__(self) -> None:
        self._tops: dict[int, tuple[int, list[PopularEntry], bool]] = {}  # partition → (version, entries, complete)
        self._limit: tuple[float, int, int] | None = None  # the order key past which the merge is not exact
        self._changed = True
        self._cached: tuple[int, list[int]] | None = None  # (k, answer) since the last change
        self.answers_cut = 0

    def put(self, partition: int, version: int, entries: Sequence[PopularEntry], complete: bool) -> bool:
        """A partition's list; an older version than the one held is ignored. Whether it changed anything."""
        held = self._tops.get(partition)
        if held is not None and held[0] >= version:
            return False
        self._tops[partition] = (version, sorted(entries, key=_order), complete)
        self._changed = True
        return True

    def __len__(self) -> int:
        return sum(len(entries) for _, entries, _ in self._tops.values())

    def top(self, k: int) -> list[int]:
        if self._changed:
            cuts = [_order(entries[-1]) for _, entries, complete in self._tops.values() if not complete and entries]
            self._limit = min(cuts) if cuts else None
            self._cached = None
            self._changed = False
        if self._cached is not None and self._cached[0] >= k:
            return self._cached[1][:k]
        out: list[int] = []
        if k > 0:
            for entry in heapq.merge(*(entries for _, entries, _ in self._tops.values()), key=_order):
                if self._limit is not None and _order(entry) > self._limit:
                    break
                out.append(entry[0])
                if len(out) == k:
                    break
            if len(out) < k and self._limit is not None:  # users left out of a cut list may come next
                self.answers_cut += 1
        self._cached = (k, out)
        return out
