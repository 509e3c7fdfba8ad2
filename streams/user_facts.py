"""What Stage 2 reads about every candidate — degree, connection activity, profile — held in flat arrays.

A list reads these for a thousand or more candidates, and each read went through several Python calls (which
partition owns the user, its state or ``user-globals``, the row cache); at a few microseconds each they were a
sixth of a refresh. Here each user has a slot; a list's candidates are one dict lookup each (at C speed) and
gathers (or, for an id array, one binary search and gathers), and only the users whose facts changed since they
were last read are read again.

Validity: a slot is read from the worker's state (:data:`FactsOf`: a local user from its partition, any other
from ``user-globals``) and stays valid until :meth:`UserFacts.invalidate` — called for the local users whose
adjacency or profile changed (before any list is ranked, by a flush or between flushes, see
:meth:`pymk.streams.refresh.Refresher.collect`) and for every user whose ``user-globals`` record changed — and
everything is dropped when the worker's partitions change. Lists are ranked under the lock that keeps events
out, right after that collect, so nothing changes between the invalidation and the reads.

Change stamps (:class:`~pymk.ranking.source.ChangeStampSource`, for the kept lists of ranking/incremental.py): each
slot has a stamp per part — "graph" (degree, activity), "profile", "embedding" — of the process's
:data:`~pymk.features.change_clock.CHANGE_CLOCK`. An invalidation takes a stamp; the re-read gives it to the slot's
graph part, and to its profile part when the profile differs from the held one (so a kept list that read the slot
before the invalidation sees the change, one that read it after does not). The index's listener
(:meth:`UserFacts.embeddings_changed`) stamps the users whose vector changed. A slot is the handle a kept list
holds; :meth:`clear` drops the slots, and the worker clears the kept lists with them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from itertools import repeat

import numpy as np

from pymk.events import Profile
from pymk.features.activity import TIME_CONSTANTS_MS
from pymk.features.change_clock import CHANGE_CLOCK, ChangeClock
from pymk.ranking.id_index import IdIndex
from pymk.ranking.source import ActivityTable

Activity = tuple[tuple[float, ...], int] | None  # (values at the anchor, anchor); None: never connected
FactsOf = Callable[[int], tuple[int, Activity, Profile | None]]  # user → (degree, activity, profile)
STAMP_PARTS = ("graph", "profile", "embedding")  # ChangeStampSource.changed_since's parts
_NO_ACTIVITY = (0.0,) * len(TIME_CONSTANTS_MS)


class UserFacts:
    """Slots 1, 2, … in order of first sight (:class:`~pymk.ranking.id_index.IdIndex`: an id array is looked up
    with one binary search); slot 0 is never valid, so an id never seen reads as stale."""

    def __init__(self, facts_of: FactsOf, capacity: int = 1024, clock: ChangeClock = CHANGE_CLOCK) -> None:
        self.facts_of = facts_of
        self.reads = 0  # users read from the state (misses), for tests and /stats
        self.clock = clock
        self.embeddings_stamp = clock.tick()  # of the latest change of any user's embedding (embeddings_changed)
        self._capacity = capacity
        self.clear()

    def clear(self) -> None:
        capacity = self._capacity
        self._index = IdIndex()
        self._valid = np.zeros(capacity, bool)
        self._degree = np.zeros(capacity, np.int64)
        self._values = np.zeros((capacity, len(TIME_CONSTANTS_MS)))
        self._anchor = np.zeros(capacity, np.int64)
        self._known = np.zeros(capacity, bool)
        self._profile: list[Profile | None] = [None]  # slot 0: no user
        self._profile_identity = np.full(capacity, id(None), np.uint64)  # id() of _profile[slot]
        self._user = np.zeros(capacity, np.int64)  # slot → user
        # change stamps (module doc): by part, the stamp of the slot's latest change; the stamp of its latest
        # invalidation (what a re-read that finds other facts stamps them with); the latest stamp of each part
        self._stamp = {part: np.zeros(capacity, np.int64) for part in STAMP_PARTS}
        self._invalidated = np.zeros(capacity, np.int64)
        self._part_latest = dict.fromkeys(STAMP_PARTS, 0)

    def __len__(self) -> int:
        return len(self._index)

    def invalidate(self, users: Iterable[int]) -> None:
        slot_of, valid, invalidated = self._index.get, self._valid, self._invalidated
        stamp = 0
        for user in users:
            slot = slot_of(user)
            if slot is not None:
                valid[slot] = False
                invalidated[slot] = stamp = stamp or self.clock.tick()

    def embeddings_changed(self, users: Sequence[int], deleted: bool = False) -> None:
        """The index's listener (:attr:`pymk.streams.global_index.GlobalIndex.listeners`): these users' vectors
        changed (or were deleted)."""
        slot_of, column = self._index.get, self._stamp["embedding"]
        stamp = self.embeddings_stamp = self.clock.tick()  # any ANN answer may move (AnnStampSource)
        for user in users:
            slot = slot_of(user)
            if slot is not None:
                column[slot] = stamp
                self._part_latest["embedding"] = stamp

    def _grow(self) -> None:
        size = 2 * len(self._valid)

        def grown(old: np.ndarray) -> np.ndarray:
            new = np.zeros((size, *old.shape[1:]), old.dtype)
            new[: len(old)] = old
            return new

        for name in ("_valid", "_degree", "_values", "_anchor", "_known", "_user", "_invalidated",
                     "_profile_identity"):
            setattr(self, name, grown(getattr(self, name)))
        self._stamp = {part: grown(column) for part, column in self._stamp.items()}

    def _read(self, user: int) -> int:
        """Read the user's facts into its slot (assigned when new); the slot."""
        slot = self._index.add(user)
        new = slot == len(self._profile)
        if new:
            self._profile.append(None)
            if slot >= len(self._valid):
                self._grow()
            self._user[slot] = user
        degree, activity, profile = self.facts_of(user)
        self.reads += 1
        if activity is None:
            known, values, anchor = False, _NO_ACTIVITY, 0
        else:
            known, values, anchor = True, activity[0], activity[1]
        if new:  # no kept list holds this slot yet: a fresh stamp, to be safe
            stamp = self._invalidated[slot] = self.clock.tick()
            for part, column in self._stamp.items():
                column[slot] = self._part_latest[part] = stamp
        else:
            # re-read after an invalidation: the graph part takes its stamp (nearly every invalidation is a degree or
            # activity record; comparing the values doubled the cost of a read), the profile only when it differs
            stamp = self._invalidated.item(slot)
            self._stamp["graph"][slot] = stamp
            if stamp > self._part_latest["graph"]:
                self._part_latest["graph"] = stamp
            held = self._profile[slot]
            if held is not profile and held != profile:
                self._stamp["profile"][slot] = stamp
                if stamp > self._part_latest["profile"]:
                    self._part_latest["profile"] = stamp
        self._degree[slot] = degree
        self._profile[slot] = profile
        self._profile_identity[slot] = id(profile)
        self._known[slot], self._values[slot], self._anchor[slot] = known, values, anchor
        self._valid[slot] = True
        return slot

    def _refresh(self, slots: np.ndarray, user_at: Callable[[int], int]) -> np.ndarray:
        """``slots`` with every missing (0) or invalid one read again (``user_at``: the user of position i)."""
        for i in np.flatnonzero(~self._valid[slots]).tolist():
            slots[i] = self._read(user_at(i))
        return slots

    def slots(self, users: Sequence[int]) -> np.ndarray:
        """The users' slots, read again where missing or invalid."""
        slots = np.fromiter(map(self._index.mapping.get, users, repeat(0)), np.int64, len(users))
        return self._refresh(slots, users.__getitem__)

    def slots_of(self, ids: np.ndarray) -> np.ndarray:
        """:meth:`slots` of an int64 id array (a binary search instead of a dict lookup per id)."""
        return self._refresh(self._index.rows(ids), lambda i: int(ids[i]))

    def degrees(self, users: Sequence[int]) -> np.ndarray:
        slots = self.slots(users)  # first: it may grow the arrays
        return self._degree[slots]

    def profiles(self, users: Sequence[int]) -> list[Profile | None]:
        return list(map(self._profile.__getitem__, self.slots(users).tolist()))

    def activity(self, users: Sequence[int]) -> ActivityTable:
        slots = self.slots(users)
        return ActivityTable(self._values[slots], self._anchor[slots], self._known[slots])

    def profiles_and_degrees_of(self, ids: np.ndarray) -> tuple[list[Profile | None], np.ndarray]:
        """The profiles and degrees of an id array (the GraphSAGE embedder's node reads)."""
        slots = self.slots_of(ids)
        return list(map(self._profile.__getitem__, slots.tolist())), self._degree[slots]

    def degrees_of(self, ids: np.ndarray) -> np.ndarray:
        slots = self.slots_of(ids)
        return self._degree[slots]

    def profiles_of(self, ids: np.ndarray) -> list[Profile | None]:
        return list(map(self._profile.__getitem__, self.slots_of(ids).tolist()))

    def profile_identities_of(self, ids: np.ndarray) -> np.ndarray:
        """The ``id()`` of each user's held profile object (uint64; ``id(None)`` without one): one gather."""
        return self._profile_identity[self.slots_of(ids)]

    def activity_of(self, ids: np.ndarray) -> ActivityTable:
        slots = self.slots_of(ids)
        return ActivityTable(self._values[slots], self._anchor[slots], self._known[slots])

    # ---- change stamps (module doc) --------------------------------------------------------------------------
    def stamp(self) -> int:
        return self.clock.now()

    def changed_since(self, slots: np.ndarray, stamp: int, part: str) -> np.ndarray:
        """(len(slots),) bool: whether each slot's ``part`` ("graph", "profile", "embedding") changed after
        ``stamp``; invalid slots are read again first (that is when a change is known)."""
        stale = np.flatnonzero(~self._valid[slots])
        for slot in slots[stale].tolist():
            if not self._valid[slot]:
                self._read(int(self._user[slot]))
        if self._part_latest[part] <= stamp:  # nobody's part changed since (profiles and embeddings rarely do)
            return np.zeros(len(slots), bool)
        return self._stamp[part][slots] > stamp

