"""An in-memory :class:`~pymk.ranking.source.RankingSource` over plain dicts and sets, for training-data
replays, tests and offline evaluation.

It computes what the worker's state computes, from scratch at read time: exact common-neighbour counts and
Adamic-Adar by a 2-hop traversal with the current degrees (a degree-1 neighbour contributes 0), distinct
views as sets of ts (a repeated identical event changes nothing), co-engagement over items with at most
``max_item_fanout`` engagers (the worker's hub rule), the latest dismissal per candidate.

It also remembers the latest event ts it has applied (:attr:`MemorySource.latest_event_ts`), which the
training-data replay checks against the as-of time of every feature it computes (no leakage).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Sequence

import numpy as np
from pymk.features.graph import adamic_adar_weight
from pymk.features.profile import merge_profile
from pymk.ranking.source import ACTIVITY_TIME_CONSTANTS_MS, EMBEDDING_DIM

from pymk.events import (
    ConnectionEvent,
    DismissalEvent,
    EngagementEvent,
    InputEvent,
    Profile,
    ProfileViewEvent,
    UserEvent,
)

AnnFunction = Callable[[int, int, Collection[int]], Sequence[tuple[int, float]]]
_NO_NEIGHBOURS: frozenset[int] = frozenset()


class MemorySource:
    """Mutable in-memory state; every read implements the :class:`RankingSource` protocol exactly.

    ``ann``: an ANN function (user, k, exclude) → [(user, cosine)] best first (e.g. a FAISS index); when not
    given, :meth:`ann_neighbours` is a brute-force search over the stored embeddings (exact, fine up to
    ~10⁵ users).
    """

    def __init__(self, ann: AnnFunction | None = None, max_item_fanout: int | None = None,
                 dim: int = EMBEDDING_DIM) -> None:
        self.ann = ann
        self.max_item_fanout = max_item_fanout
        self.dim = dim
        self.adjacency: dict[int, set[int]] = {}
        self.profiles: dict[int, Profile] = {}
        self.views_out: dict[int, dict[int, set[int]]] = {}  # viewer → viewed → {ts}
        self.views_in: dict[int, dict[int, set[int]]] = {}  # viewed → viewer → {ts}
        self.dismissals: dict[int, dict[int, int]] = {}  # user → candidate → latest ts
        self.blocks: dict[int, set[int]] = {}
        self.engaged: dict[int, dict[int, int]] = {}  # user → item → first ts
        self.engagers: dict[int, set[int]] = {}  # item → users
        self.vectors: dict[int, np.ndarray] = {}  # user → unit float32 embedding
        self._matrix: tuple[np.ndarray, np.ndarray] | None = None  # (ids, rows) for brute-force ANN
        self.latest_event_ts: int | None = None
        # user → (decayed activity per time constant at activity_ts, activity_ts): see ActivitySource
        self.activity: dict[int, tuple[list[float], int]] = {}
        self.last_change: dict[int, int] = {}  # user → ts of its latest connection add or remove
        self._graph_version = 0  # bumped by every connection change: keys the resource-allocation cache
        self._resource_allocation: tuple[int, int, dict[int, float]] | None = None  # (user, version, RA)
        self._active_order: tuple[int, int, list[int]] | None = None  # (as_of, version, users best first)

    # ---- mutations -----------------------------------------------------------------------------------------------
    def _seen(self, ts: int | None) -> None:
        if ts is not None and (self.latest_event_ts is None or ts > self.latest_event_ts):
            self.latest_event_ts = ts

    def add_user(self, user: int) -> None:
        self.adjacency.setdefault(user, set())

    def add_connection(self, u: int, v: int, ts: int | None = None) -> None:
        if u == v:
            raise ValueError("a user cannot connect to itself")
        self._seen(ts)
        self._graph_version += 1
        row_u, row_v = self.adjacency.setdefault(u, set()), self.adjacency.setdefault(v, set())
        if ts is not None and v not in row_u:  # a new connection (a repeated add changes nothing)
            for user in (u, v):
                self._count_activity(user, ts)
                self._changed(user, ts)
        row_u.add(v)
        row_v.add(u)

    def remove_connection(self, u: int, v: int, ts: int | None = None) -> None:
        self._seen(ts)
        self._graph_version += 1
        if ts is not None and v in self.adjacency.get(u, ()):
            self._changed(u, ts)
            self._changed(v, ts)
        self.adjacency.get(u, set()).discard(v)
        self.adjacency.get(v, set()).discard(u)

    def _changed(self, user: int, ts: int) -> None:
        if ts > self.last_change.get(user, ts - 1):
            self.last_change[user] = ts

    def _count_activity(self, user: int, ts: int) -> None:
        """One more connection add at ``ts`` in the decayed counters (the O(1) update of ActivitySource)."""
        held = self.activity.get(user)
        if held is None:
            self.activity[user] = ([1.0] * len(ACTIVITY_TIME_CONSTANTS_MS), ts)
            return
        values, last = held
        if ts >= last:
            self.activity[user] = ([value * math.exp(-(ts - last) / tau) + 1.0
                                    for value, tau in zip(values, ACTIVITY_TIME_CONSTANTS_MS, strict=True)], ts)
        else:  # out of order: add its contribution as seen from last
            self.activity[user] = ([value + math.exp(-(last - ts) / tau)
                                    for value, tau in zip(values, ACTIVITY_TIME_CONSTANTS_MS, strict=True)], last)

    def add_view(self, viewer: int, viewed: int, ts: int) -> None:
        if viewer == viewed:
            return
        self._seen(ts)
        self.views_out.setdefault(viewer, {}).setdefault(viewed, set()).add(ts)
        self.views_in.setdefault(viewed, {}).setdefault(viewer, set()).add(ts)

    def add_dismissal(self, user: int, candidate: int, ts: int) -> None:
        self._seen(ts)
        row = self.dismissals.setdefault(user, {})
        row[candidate] = max(ts, row.get(candidate, ts))

    def add_engagement(self, user: int, item: int, ts: int) -> None:
        self._seen(ts)
        row = self.engaged.setdefault(user, {})
        row[item] = min(ts, row.get(item, ts))
        self.engagers.setdefault(item, set()).add(user)

    def set_profile(self, user: int, profile: Profile, ts: int | None = None) -> None:
        """Merge ``profile`` into the user's (given fields replace, ``None`` fields are kept)."""
        self._seen(ts)
        self.profiles[user] = merge_profile(self.profiles.get(user), profile)

    def block(self, user: int, other: int) -> None:
        self.blocks.setdefault(user, set()).add(other)

    def set_embedding(self, user: int, vector: np.ndarray | None) -> None:
        """Store the user's embedding, L2-normalised (None removes it)."""
        self._matrix = None
        if vector is None:
            self.vectors.pop(user, None)
            return
        vector = np.asarray(vector, np.float32).reshape(self.dim)
        norm = float(np.linalg.norm(vector))
        if norm == 0.0 or not np.isfinite(norm):
            raise ValueError("an embedding must be finite and non-zero")
        self.vectors[user] = vector / np.float32(norm)

    def set_embeddings(self, vectors: dict[int, np.ndarray]) -> None:
        for user, vector in vectors.items():
            self.set_embedding(user, vector)

    def apply(self, event: InputEvent) -> None:
        """Apply one input event of the contract (in ts order, as the worker sees them)."""
        if isinstance(event, ConnectionEvent):
            if event.src == event.dst:
                return
            if event.action == "remove":
                self.remove_connection(event.src, event.dst, event.ts)
            else:
                self.add_connection(event.src, event.dst, event.ts)
        elif isinstance(event, ProfileViewEvent):
            self.add_view(event.viewer, event.viewed, event.ts)
        elif isinstance(event, DismissalEvent):
            self.add_dismissal(event.user, event.candidate, event.ts)
        elif isinstance(event, EngagementEvent):
            self.add_engagement(event.user, event.item, event.ts)
        elif isinstance(event, UserEvent):
            self.set_profile(event.user, event.profile, event.ts)
        else:
            raise TypeError(f"not an input event: {event!r}")

    def apply_all(self, events: Iterable[InputEvent]) -> None:
        for event in events:
            self.apply(event)

    # ---- RankingSource -------------------------------------------------------------------------------------------
    def users(self) -> list[int]:
        return list(self.adjacency)

    def neighbours(self, user: int) -> Collection[int]:
        return self.adjacency.get(user, _NO_NEIGHBOURS)

    def two_hop(self, user: int) -> tuple[dict[int, int], dict[int, float]]:
        adjacency = self.adjacency
        own = adjacency.get(user, _NO_NEIGHBOURS)
        counts: dict[int, int] = {}
        scores: dict[int, float] = {}
        allocation: dict[int, float] = {}
        for middle in own:
            others = adjacency[middle]
            weight = adamic_adar_weight(len(others))
            share = 1.0 / len(others)
            for other in others:
                if other in counts:
                    counts[other] += 1
                    scores[other] += weight
                    allocation[other] += share
                elif other != user and other not in own:
                    counts[other] = 1
                    scores[other] = weight
                    allocation[other] = share
        # Computed in the same pass: the feature builder asks for it right after Stage 1 asked for two_hop.
        self._resource_allocation = (user, self._graph_version, allocation)
        return counts, scores

    def paths_of_length_three(self, user: int, candidates: Sequence[int]) -> list[int]:
        adjacency = self.adjacency
        own = adjacency.get(user, _NO_NEIGHBOURS)
        # |N(u) ∩ N(w)| for every w reachable in two steps (neighbours of u included, u itself excluded).
        common: dict[int, int] = {}
        for middle in own:
            for other in adjacency[middle]:
                common[other] = common.get(other, 0) + 1
        common.pop(user, None)
        get = common.get
        return [sum(get(w, 0) for w in adjacency.get(candidate, _NO_NEIGHBOURS)) for candidate in candidates]

    def two_hop_resource_allocation(self, user: int) -> dict[int, float]:
        held = self._resource_allocation
        if held is None or held[0] != user or held[1] != self._graph_version:
            self.two_hop(user)
            held = self._resource_allocation
        assert held is not None
        return held[2]

    def common_neighbors(self, user: int, candidate: int) -> list[int]:
        return sorted(self.neighbours(user) & self.neighbours(candidate))  # type: ignore[operator]

    def degree(self, user: int) -> int:
        return len(self.adjacency.get(user, _NO_NEIGHBOURS))

    def profile(self, user: int) -> Profile | None:
        return self.profiles.get(user)

    # ---- ActivitySource ------------------------------------------------------------------------------------------
    def connection_activity(self, user: int, as_of_ms: int) -> tuple[float, ...]:
        held = self.activity.get(user)
        if held is None:
            return (0.0,) * len(ACTIVITY_TIME_CONSTANTS_MS)
        values, last = held
        elapsed = max(0, as_of_ms - last)
        return tuple(value * math.exp(-elapsed / tau) for value, tau in zip(values, ACTIVITY_TIME_CONSTANTS_MS,
                                                                             strict=True))

    def last_connection_ts(self, user: int) -> int | None:
        return self.last_change.get(user)

    # ---- PopularSource -------------------------------------------------------------------------------------------
    def most_active(self, k: int, as_of_ms: int) -> list[int]:
        held = self._active_order
        if held is None or held[0] != as_of_ms or held[1] != self._graph_version:
            weekly = 1  # index of the 7-day time constant
            keyed = [(-self.connection_activity(user, as_of_ms)[weekly], -len(self.adjacency[user]), user)
                     for user in self.activity if self.adjacency.get(user)]
            keyed.sort()
            held = self._active_order = (as_of_ms, self._graph_version, [user for _, _, user in keyed])
        return held[2][:k]

    def profile_views(self, user: int) -> dict[int, tuple[int, int, int]]:
        out = self.views_out.get(user, {})
        back = self.views_in.get(user, {})
        views: dict[int, tuple[int, int, int]] = {}
        for other in out.keys() | back.keys():
            stamps_out, stamps_in = out.get(other, set()), back.get(other, set())
            views[other] = (len(stamps_out), len(stamps_in), max(stamps_out | stamps_in))
        return views

    def co_engaged_counts(self, user: int) -> dict[int, int]:
        counts: dict[int, int] = {}
        for item in self.engaged.get(user, {}):
            engagers = self.engagers[item]
            if self.max_item_fanout is not None and len(engagers) > self.max_item_fanout:
                continue  # a hub item says little about two people (the worker's rule)
            for other in engagers:
                if other != user:
                    counts[other] = counts.get(other, 0) + 1
        return counts

    def dismissed(self, user: int) -> dict[int, int]:
        return self.dismissals.get(user, {})

    def blocked(self, user: int) -> Collection[int]:
        return self.blocks.get(user, _NO_NEIGHBOURS)

    def embedding(self, user: int) -> np.ndarray | None:
        return self.vectors.get(user)

    def embeddings(self, users: Sequence[int]) -> np.ndarray:
        out = np.full((len(users), self.dim), np.nan, np.float32)
        vectors = self.vectors
        for i, user in enumerate(users):
            vector = vectors.get(user)
            if vector is not None:
                out[i] = vector
        return out

    def ann_neighbours(self, user: int, k: int, exclude: Collection[int]) -> list[tuple[int, float]]:
        if self.ann is not None:
            return list(self.ann(user, k, exclude))
        query = self.vectors.get(user)
        if query is None or k <= 0:
            return []
        if self._matrix is None:
            ids = np.fromiter(self.vectors.keys(), np.int64, len(self.vectors))
            rows = np.stack(list(self.vectors.values())) if len(ids) else np.empty((0, self.dim), np.float32)
            self._matrix = (ids, rows)
        ids, rows = self._matrix
        scores = rows @ query
        allowed = ids != user
        if exclude:
            allowed &= ~np.isin(ids, np.fromiter(exclude, np.int64, len(exclude)))
        index = np.flatnonzero(allowed)
        if len(index) > k:
            index = index[np.argpartition(-scores[index], k - 1)[:k]]
        index = index[np.lexsort((ids[index], -scores[index]))]
        return [(int(ids[i]), float(scores[i])) for i in index]
