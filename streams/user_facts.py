"""What Stage 2 reads about every candidate — degree, connection activity, profile — held in flat arrays.

A list reads these for a thousand or more candidates, and each read went through several Python calls (which
partition owns the user, its state or ``user-globals``, the row cache); at a few microseconds each they were a
sixth of a refresh. Here each user has a slot; a list's candidates are one dict lookup each (at C speed) and
gathers, and only the users whose facts changed since they were last read are read again.

Validity: a slot is read from the worker's state (:data:`FactsOf`: a local user from its partition, any other
from ``user-globals``) and stays valid until :meth:`UserFacts.invalidate` — called for the local users whose
adjacency or profile changed (before any list is ranked, by a flush or between flushes, see
:meth:`pymk.streams.refresh.Refresher.collect`) and for every user whose ``user-globals`` record changed — and
everything is dropped when the worker's partitions change. Lists are ranked under the lock that keeps events
out, right after that collect, so nothing changes between the invalidation and the reads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from itertools import repeat

import numpy as np
from pymk.features.activity import TIME_CONSTANTS_MS
from pymk.ranking.source import ActivityTable

from pymk.events import Profile

Activity = tuple[tuple[float, ...], int] | None  # (values at the anchor, anchor); None: never connected
FactsOf = Callable[[int], tuple[int, Activity, Profile | None]]  # user → (degree, activity, profile)


class UserFacts:
    def __init__(self, facts_of: FactsOf, capacity: int = 1024) -> None:
        self.facts_of = facts_of
        self.reads = 0  # users read from the state (misses), for tests and /stats
        self._capacity = capacity
        self.clear()

    def clear(self) -> None:
        capacity = self._capacity
        self._slot: dict[int, int] = {}
        self._valid = np.zeros(capacity, bool)
        self._degree = np.zeros(capacity, np.int64)
        self._values = np.zeros((capacity, len(TIME_CONSTANTS_MS)))
        self._anchor = np.zeros(capacity, np.int64)
        self._known = np.zeros(capacity, bool)
        self._profile: list[Profile | None] = []

    def __len__(self) -> int:
        return len(self._slot)

    def invalidate(self, users: Iterable[int]) -> None:
        slot_of, valid = self._slot, self._valid
        for user in users:
            slot = slot_of.get(user)
            if slot is not None:
                valid[slot] = False

    def _grow(self) -> None:
        size = 2 * len(self._valid)
        for name in ("_valid", "_degree", "_values", "_anchor", "_known"):
            old = getattr(self, name)
            new = np.zeros((size, *old.shape[1:]), old.dtype)
            new[: len(old)] = old
            setattr(self, name, new)

    def slots(self, users: Sequence[int]) -> np.ndarray:
        """The users' slots, read again where missing or invalid."""
        slot_of = self._slot
        slots = np.fromiter(map(slot_of.get, users, repeat(-1)), np.int64, len(users))
        stale = np.flatnonzero((slots < 0) | ~self._valid[slots])  # slot -1 reads the last row: or-ed away
        for i in stale.tolist():
            user = users[i]
            slot = slot_of.get(user)
            if slot is None:
                slot = slot_of[user] = len(self._profile)
                self._profile.append(None)
                if slot >= len(self._valid):
                    self._grow()
            degree, activity, profile = self.facts_of(user)
            self.reads += 1
            self._degree[slot] = degree
            self._profile[slot] = profile
            if activity is None:
                self._known[slot], self._values[slot], self._anchor[slot] = False, 0.0, 0
            else:
                self._known[slot], self._values[slot], self._anchor[slot] = True, activity[0], activity[1]
            self._valid[slot] = True
            slots[i] = slot
        return slots

    def degrees(self, users: Sequence[int]) -> np.ndarray:
        slots = self.slots(users)  # first: it may grow the arrays
        return self._degree[slots]

    def profiles(self, users: Sequence[int]) -> list[Profile | None]:
        return list(map(self._profile.__getitem__, self.slots(users).tolist()))

    def activity(self, users: Sequence[int]) -> ActivityTable:
        slots = self.slots(users)
        return ActivityTable(self._values[slots], self._anchor[slots], self._known[slots])
