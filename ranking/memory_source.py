"""An in-memory :class:`~pymk.ranking.source.RankingSource` over plain dicts and sets, for training-data
replays, tests and offline evaluation.

It computes what the worker's state computes, from scratch at read time: exact common-neighbour counts and
Adamic-Adar by a 2-hop traversal with the current degrees (a degree-1 neighbour contributes 0), distinct
views as sets of ts (a repeated identical event changes nothing), co-engagement over items with at most
``max_item_fanout`` engagers (the worker's hub rule), the latest dismissal per candidate. With ``hub_degree``
H > 0 (the worker's ``PYMK_HUB_DEGREE``), no 2-path runs through a user of more than H connections: not in the
2-hop candidates, counts, Adamic-Adar, resource allocation, the ego adjacency nor the mutual connections, as the
worker's partitions read them (features/graph.py), so the offline evaluation measures the product under a cap.

It also remembers the latest event ts it has applied (:attr:`MemorySource.latest_event_ts`), which the
training-data replay checks against the as-of time of every feature it computes (no leakage).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from itertools import chain, repeat
from types import MappingProxyType
from typing import Any

import numpy as np

from pymk.events import (
    ConnectionEvent,
    DismissalEvent,
    EngagementEvent,
    InputEvent,
    Profile,
    ProfileViewEvent,
    UserEvent,
)
from pymk.features.activity import TIME_CONSTANTS_MS, ActivityLeaderboard, activity_at, activity_values
from pymk.features.graph import TwoHopArrays, adamic_adar_weight, edge_version, is_alive, version_ts
from pymk.features.profile import merge_profile
from pymk.ranking.id_index import IdIndex, ids_in
from pymk.ranking.source import EMBEDDING_DIM, ActivityTable, EgoAdjacency

AnnFunction = Callable[[int, int, Collection[int]], Sequence[tuple[int, float]]]
_NO_NEIGHBOURS: frozenset[int] = frozenset()


_AA_WEIGHTS = np.array([adamic_adar_weight(d) for d in range(1024)])


def _adamic_adar_table(largest: int) -> np.ndarray:
    """adamic_adar_weight(d) for d = 0..largest (math.log's bits, as the dict loop), grown on demand."""
    global _AA_WEIGHTS
    if largest >= len(_AA_WEIGHTS):
        size = max(largest + 1, 2 * len(_AA_WEIGHTS))
        _AA_WEIGHTS = np.concatenate([_AA_WEIGHTS, [adamic_adar_weight(d) for d in range(len(_AA_WEIGHTS), size)]])
    return _AA_WEIGHTS


class MemorySource:
    """Mutable in-memory state; every read implements the :class:`RankingSource` protocol exactly.

    ``ann``: an ANN function (user, k, exclude) → [(user, cosine)] best first (e.g. a FAISS index); when not
    given, :meth:`ann_neighbours` is a brute-force search over the stored embeddings (exact, fine up to
    ~10⁵ users).
    """

    def __init__(self, ann: AnnFunction | None = None, max_item_fanout: int | None = None,
                 dim: int = EMBEDDING_DIM, hub_degree: int = 0) -> None:
        if hub_degree < 0:
            raise ValueError("hub_degree must be 0 (no hubs) or positive")
        self.ann = ann
        self.hub_degree = hub_degree
        self.max_item_fanout = max_item_fanout
        self.dim = dim
        self.adjacency: dict[int, set[int]] = {}
        # Every write (set_profile, or a test's direct edit) also sets the user's profile identity column
        self.profiles: dict[int, Profile] = _ProfileMap(self._profile_written)
        self.views_out: dict[int, dict[int, set[int]]] = {}  # viewer → viewed → {ts}
        self.views_in: dict[int, dict[int, set[int]]] = {}  # viewed → viewer → {ts}
        # user → other → (views out, views in, latest either way): profile_views' answer, kept up to date by
        # add_view instead of rebuilt from the stamp sets at every read (a kept list's view update reads it)
        self._view_summary: dict[int, dict[int, tuple[int, int, int]]] = {}
        self.dismissals: dict[int, dict[int, int]] = {}  # user → candidate → latest ts
        self.blocks: dict[int, set[int]] = {}
        self.engaged: dict[int, dict[int, int]] = {}  # user → item → first ts
        self.engagers: dict[int, set[int]] = {}  # item → users
        self.vectors: dict[int, np.ndarray] = {}  # user → unit float32 embedding
        self._matrix: tuple[np.ndarray, np.ndarray, dict[int, int]] | None = None  # see _embedding_matrix
        self.latest_event_ts: int | None = None
        # Timed connection events go through the worker's edge registers (user → neighbour → version, last
        # writer wins, a removal wins a tie), so out-of-order and repeated events end where the worker's do;
        # activity is then the same function of the registers (pymk.features.activity).
        self.registers: dict[int, dict[int, int]] = {}
        self.activity: dict[int, tuple[tuple[float, ...], int]] = {}  # user → (activity at anchor, anchor)
        # The same, as rows of flat arrays (slot 0: never connected), for activity_table's one gather.
        self._activity_slot: dict[int, int] = {}
        self._activity_values = np.zeros((1024, len(TIME_CONSTANTS_MS)))
        self._activity_anchors = np.zeros(1024, np.int64)
        self.leaderboard = ActivityLeaderboard()  # the PopularSource order
        self._graph_version = 0  # bumped by every connection change: keys the resource-allocation cache
        self._resource_allocation: tuple[int, int, dict[int, float]] | None = None  # (user, version, RA)
        # two_hop_arrays: each middle user's neighbours as an array, kept while the graph does not change, and
        # the last user's arrays (user, version, arrays)
        self._middle_ids: dict[int, np.ndarray] = {}  # user → its neighbours' rows; dropped when they change
        self._middle_id_arrays: dict[int, np.ndarray] = {}  # user → its neighbours' ids (ego_adjacency), the same
        self._two_hop_held: tuple[int, int, TwoHopArrays] | None = None
        # Columns for IdArraySource: a dense row per user seen (row 0: nobody), found by a binary search over the
        # sorted ids, so 2,000 candidates cost a few gathers instead of a cold dict lookup each.
        self._rows = IdIndex()
        self._degree_col = np.zeros(1024, np.int64)
        self._activity_slot_col = np.zeros(1024, np.int64)
        self._profile_identity_col = np.full(1024, id(None), np.uint64)  # ProfileIdentitySource
        self._embedding_col: np.ndarray | None = None  # row → row of _embedding_matrix, -1 without one
        # ChangeStampSource: a counter bumped by every change, and per user (row) the counter at its latest change of
        # degree, activity, embedding or profile; per user and per item the latest change of views and engagements.
        self._stamp = 0
        self._stamp_cols = {part: np.zeros(1024, np.int64) for part in ("graph", "embedding", "profile")}
        self._part_latest = dict.fromkeys(self._stamp_cols, 0)
        self._views_stamp: dict[int, int] = {}
        self._item_stamp: dict[int, int] = {}

    # ---- mutations -----------------------------------------------------------------------------------------------
    def _seen(self, ts: int | None) -> None:
        if ts is not None and (self.latest_event_ts is None or ts > self.latest_event_ts):
            self.latest_event_ts = ts

    def _row(self, user: int) -> int:
        row = self._rows.get(user)
        if row is None:
            row = self._rows.add(user)
            self._embedding_col = None
            if row >= len(self._degree_col):
                self._degree_col = np.concatenate([self._degree_col, np.zeros_like(self._degree_col)])
                self._activity_slot_col = np.concatenate([self._activity_slot_col,
                                                          np.zeros_like(self._activity_slot_col)])
                self._profile_identity_col = np.concatenate([self._profile_identity_col,
                                                             np.full_like(self._profile_identity_col, id(None))])
                self._stamp_cols = {part: np.concatenate([column, np.zeros_like(column)])
                                    for part, column in self._stamp_cols.items()}
            self._stamp += 1
            for part, column in self._stamp_cols.items():
                column[0] = self._part_latest[part] = self._stamp  # a handle taken before the row: changed
        return row

    def _changed(self, user: int, part: str) -> None:
        """The user's ``part`` changed: "graph" (degree, activity), "embedding" or "profile" (ChangeStampSource)."""
        row = self._row(user)  # first: it may grow the columns
        self._stamp += 1
        self._stamp_cols[part][row] = self._part_latest[part] = self._stamp

    def _profile_written(self, user: int, profile: Profile | None) -> None:
        row = self._row(user)  # first: it may grow the columns
        self._profile_identity_col[row] = id(profile)

    def _set_degree(self, user: int) -> None:
        row = self._row(user)  # first: it may grow the columns
        self._degree_col[row] = len(self.adjacency.get(user, _NO_NEIGHBOURS))
        self._middle_ids.pop(user, None)
        self._middle_id_arrays.pop(user, None)
        self._changed(user, "graph")

    def add_user(self, user: int) -> None:
        self.adjacency.setdefault(user, set())
        self._set_degree(user)

    def add_connection(self, u: int, v: int, ts: int | None = None) -> None:
        if u == v:
            raise ValueError("a user cannot connect to itself")
        self._seen(ts)
        if ts is not None and not self._merge_register(u, v, edge_version(ts, "add")):
            return  # a duplicate or an older event: nothing changes
        self._graph_version += 1
        self.adjacency.setdefault(u, set()).add(v)
        self.adjacency.setdefault(v, set()).add(u)
        self._set_degree(u)
        self._set_degree(v)
        if ts is not None:
            self._update_activity(u)
            self._update_activity(v)

    def remove_connection(self, u: int, v: int, ts: int | None = None) -> None:
        self._seen(ts)
        if ts is not None and not self._merge_register(u, v, edge_version(ts, "remove")):
            return
        self._graph_version += 1
        self.adjacency.get(u, set()).discard(v)
        self.adjacency.get(v, set()).discard(u)
        self._set_degree(u)
        self._set_degree(v)
        if ts is not None:
            self._update_activity(u)
            self._update_activity(v)

    def _merge_register(self, u: int, v: int, version: int) -> bool:
        """Apply the register (u, v) to both users (the pair's registers are always equal); False if older."""
        old = self.registers.get(u, {}).get(v)
        if old is not None and old >= version:
            return False
        self.registers.setdefault(u, {})[v] = version
        self.registers.setdefault(v, {})[u] = version
        return True

    def _update_activity(self, user: int) -> None:
        """The worker's ``degree_update``: activity over the alive registers, anchored at the latest one."""
        row = self.registers[user]
        anchor = version_ts(max(row.values()))
        values = activity_values((version_ts(v) for v in row.values() if is_alive(v)), anchor)
        self.activity[user] = (values, anchor)
        slot = self._activity_slot.setdefault(user, len(self._activity_slot) + 1)
        if slot >= len(self._activity_anchors):
            self._activity_values = np.concatenate([self._activity_values, np.zeros_like(self._activity_values)])
            self._activity_anchors = np.concatenate([self._activity_anchors, np.zeros_like(self._activity_anchors)])
        self._activity_values[slot] = values
        self._activity_anchors[slot] = anchor
        self.adjacency.setdefault(user, set())
        row = self._row(user)  # first: it may grow the columns
        self._activity_slot_col[row] = slot
        self._changed(user, "graph")
        self.leaderboard.update(user, values, anchor, len(self.adjacency[user]))

    def add_view(self, viewer: int, viewed: int, ts: int) -> None:
        if viewer == viewed:
            return
        self._seen(ts)
        out = self.views_out.setdefault(viewer, {}).setdefault(viewed, set())
        back = self.views_in.setdefault(viewed, {}).setdefault(viewer, set())
        out.add(ts)
        back.add(ts)
        # the pair's summary from both ends: the viewer's view out is the viewed user's view in
        latest = max(ts, self._view_summary.get(viewer, {}).get(viewed, (0, 0, ts))[2])
        returned = len(self.views_out.get(viewed, {}).get(viewer, ()))
        self._view_summary.setdefault(viewer, {})[viewed] = (len(out), returned, latest)
        self._view_summary.setdefault(viewed, {})[viewer] = (returned, len(out), latest)
        self._stamp += 1
        self._views_stamp[viewer] = self._views_stamp[viewed] = self._stamp

    def add_dismissal(self, user: int, candidate: int, ts: int) -> None:
        self._seen(ts)
        row = self.dismissals.setdefault(user, {})
        row[candidate] = max(ts, row.get(candidate, ts))

    def add_engagement(self, user: int, item: int, ts: int) -> None:
        self._seen(ts)
        row = self.engaged.setdefault(user, {})
        row[item] = min(ts, row.get(item, ts))
        self.engagers.setdefault(item, set()).add(user)
        self._stamp += 1
        self._item_stamp[item] = self._stamp  # every engager's co-engagement counts may have moved

    def set_profile(self, user: int, profile: Profile, ts: int | None = None) -> None:
        """Merge ``profile`` into the user's (given fields replace, ``None`` fields are kept)."""
        self._seen(ts)
        self.profiles[user] = merge_profile(self.profiles.get(user), profile)
        self._changed(user, "profile")

    def block(self, user: int, other: int) -> None:
        self.blocks.setdefault(user, set()).add(other)

    def set_embedding(self, user: int, vector: np.ndarray | None) -> None:
        """Store the user's embedding, L2-normalised (None removes it)."""
        self._matrix = None
        self._embedding_col = None
        self._changed(user, "embedding")
        if vector is None:
            self.vectors.pop(user, None)
            return
        vector = np.asarray(vector, np.float32).reshape(self.dim)
        self._row(user)  # every user with an embedding has a row (embeddings_of)
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

    def visible_neighbours(self, user: int) -> np.ndarray:
        """:meth:`neighbours` as an int64 array (all are visible here), kept until the user's connections change:
        the arrays :meth:`ego_adjacency` keeps (the cross-attention re-ranker reads the same ones)."""
        ids = self._middle_id_arrays.get(user)
        if ids is None:
            others = self.adjacency.get(user, _NO_NEIGHBOURS)
            ids = np.fromiter(others, np.int64, len(others))
            if user in self.adjacency:  # an unknown user's empty array is not kept: nothing would drop it
                self._middle_id_arrays[user] = ids
        return ids

    def is_hub(self, user: int) -> bool:
        """More connections than ``hub_degree`` (never without one): no 2-path runs through the user."""
        return 0 < self.hub_degree < len(self.adjacency.get(user, _NO_NEIGHBOURS))

    def _middles(self, own: Collection[int]) -> list[int]:
        """The user's neighbours a 2-path may run through, by id (hubs left out)."""
        middles = sorted(own)
        return [middle for middle in middles if not self.is_hub(middle)] if self.hub_degree else middles

    def two_hop(self, user: int) -> tuple[dict[int, int], dict[int, float]]:
        adjacency = self.adjacency
        own = adjacency.get(user, _NO_NEIGHBOURS)
        counts: dict[int, int] = {}
        scores: dict[int, float] = {}
        allocation: dict[int, float] = {}
        # in neighbour-id order, like the worker (PartitionGraph.two_hop_with_allocation): float sums then have
        # the same bits, so offline and live lists do not swap near-ties
        for middle in self._middles(own):
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

    def two_hop_arrays(self, user: int) -> TwoHopArrays:
        """:meth:`two_hop` and the resource allocation as arrays by id (:class:`TwoHopArraySource`), the same
        values to the last bit: ``np.bincount`` adds each candidate's terms in input order, the middle users' id
        order, as the dict loop does."""
        version = self._graph_version
        held = self._two_hop_held
        if held is not None and held[0] == user and held[1] == version:
            return held[2]
        own = self.adjacency.get(user, _NO_NEIGHBOURS)
        middles = self._middles(own)
        if not middles:
            arrays = TwoHopArrays.empty()
        else:
            # Each middle user's neighbours as rows of the IdIndex (a user's row never changes), so the sums are
            # np.bincount over rows (no sort of the 2-paths, which a hub neighbour makes tens of thousands long)
            parts = []
            for middle in middles:
                rows = self._middle_ids.get(middle)
                if rows is None:
                    others = self.adjacency[middle]
                    rows = self._middle_ids[middle] = self._rows.rows(np.fromiter(others, np.int64, len(others)))
                parts.append(rows)
            sizes = np.fromiter(map(len, parts), np.int64, len(parts))
            others = np.concatenate(parts)
            size = len(self._rows) + 1
            mine = np.zeros(size, bool)
            mine[self._rows.rows(np.fromiter(own, np.int64, len(own)))] = True
            mine[self._rows.get(user) or 0] = True
            keep = ~mine[others]
            weights = _adamic_adar_table(int(sizes.max()))[sizes]
            adamic_adar = np.repeat(weights, sizes)[keep]
            allocation = np.repeat(1.0 / sizes, sizes)[keep]
            kept = others[keep]
            # in id order: the IdIndex's sorted ids and their rows
            sorted_ids, sorted_rows = self._rows.sorted()
            counts = np.bincount(kept, minlength=size)[sorted_rows]
            found = np.flatnonzero(counts)
            at = sorted_rows[found]
            arrays = TwoHopArrays(sorted_ids[found], counts[found].astype(np.int64),
                                  np.bincount(kept, adamic_adar, minlength=size)[at],
                                  np.bincount(kept, allocation, minlength=size)[at])
        self._two_hop_held = (user, version, arrays)
        return arrays

    def ego_adjacency(self, user: int) -> EgoAdjacency:
        """:class:`~pymk.ranking.source.EgoAdjacencySource`: the user's neighbours by id and their neighbour
        arrays (kept like :meth:`two_hop_arrays`' rows, until that middle user's connections change)."""
        middles = self._middles(self.adjacency.get(user, _NO_NEIGHBOURS))
        if not middles:
            return EgoAdjacency.empty()
        rows = []
        for middle in middles:
            rows.append(self.visible_neighbours(middle))
        return EgoAdjacency(np.array(middles, np.int64), np.fromiter(map(len, rows), np.int64, len(rows)),
                            np.concatenate(rows))

    def two_hop_resource_allocation(self, user: int) -> dict[int, float]:
        arrays = self._two_hop_held
        if arrays is not None and arrays[0] == user and arrays[1] == self._graph_version:
            return dict(zip(arrays[2].ids.tolist(), arrays[2].resource_allocation.tolist(), strict=True))
        held = self._resource_allocation
        if held is None or held[0] != user or held[1] != self._graph_version:
            self.two_hop(user)
            held = self._resource_allocation
        assert held is not None
        return held[2]

    def common_neighbors(self, user: int, candidate: int) -> list[int]:
        common = sorted(self.neighbours(user) & self.neighbours(candidate))  # type: ignore[operator]
        return [z for z in common if not self.is_hub(z)] if self.hub_degree else common

    def degree(self, user: int) -> int:
        return len(self.adjacency.get(user, _NO_NEIGHBOURS))

    def profile(self, user: int) -> Profile | None:
        return self.profiles.get(user)

    # ---- ActivitySource ------------------------------------------------------------------------------------------
    def connection_activity(self, user: int, as_of_ms: int) -> tuple[float, ...]:
        held = self.activity.get(user)
        if held is None:
            return (0.0,) * len(TIME_CONSTANTS_MS)
        return activity_at(held[0], held[1], as_of_ms)

    def last_connection_ts(self, user: int) -> int | None:
        held = self.activity.get(user)
        return None if held is None else held[1]

    # ActivityTableSource
    def activity_table(self, users: Sequence[int]) -> ActivityTable:
        slots = np.fromiter(map(self._activity_slot.get, users, repeat(0)), np.int64, len(users))
        return ActivityTable(self._activity_values[slots], self._activity_anchors[slots], slots > 0)

    # ---- BatchReadSource -----------------------------------------------------------------------------------------
    def many_degrees(self, users: Sequence[int]) -> np.ndarray:
        return np.fromiter(map(len, map(self.adjacency.get, users, repeat(_NO_NEIGHBOURS))), np.int64, len(users))

    def many_profiles(self, users: Sequence[int]) -> list[Profile | None]:
        return list(map(self.profiles.get, users))

    # ---- IdArraySource ------------------------------------------------------------------------------------------
    def degrees_of(self, ids: np.ndarray) -> np.ndarray:
        return self._degree_col[self._rows.rows(ids)]

    def profiles_of(self, ids: np.ndarray) -> list[Profile | None]:
        return self.many_profiles(ids.tolist())

    # ---- ProfileIdentitySource -----------------------------------------------------------------------------------
    def profile_identities_of(self, ids: np.ndarray) -> np.ndarray:
        return self._profile_identity_col[self._rows.rows(ids)]

    def activity_table_of(self, ids: np.ndarray) -> ActivityTable:
        slots = self._activity_slot_col[self._rows.rows(ids)]
        return ActivityTable(self._activity_values[slots], self._activity_anchors[slots], slots > 0)

    def embeddings_of(self, ids: np.ndarray) -> np.ndarray:
        stored, rows, _ = self._embedding_matrix()
        if self._embedding_col is None:
            column = np.full(len(self._rows) + 1, -1, np.int64)
            column[self._rows.rows(stored)] = np.arange(len(stored))
            self._embedding_col = column
        index = self._embedding_col[self._rows.rows(ids)]
        out = rows[index] if len(rows) else np.empty((len(ids), self.dim), np.float32)
        out[index < 0] = np.nan
        return out

    # ---- ChangeStampSource ---------------------------------------------------------------------------------------
    def change_stamp(self) -> int:
        return self._stamp

    def stamp_handles(self, ids: np.ndarray) -> np.ndarray:
        return self._rows.rows(ids)  # rows stay a user's for the source's life (row 0: not seen yet)

    def changed_since(self, handles: np.ndarray, stamp: int, part: str) -> np.ndarray:
        if self._part_latest[part] <= stamp:  # nobody's part changed since (embeddings and profiles rarely do)
            return np.zeros(len(handles), bool)
        return self._stamp_cols[part][handles] > stamp

    def ann_stamp(self) -> int:  # AnnStampSource: any embedding's latest change moves every ANN answer
        return self._part_latest["embedding"]

    def views_stamp(self, user: int) -> int:
        return self._views_stamp.get(user, 0)

    def co_engagement_stamp(self, user: int) -> int:
        items = self.engaged.get(user)
        return max(map(self._item_stamp.__getitem__, items)) if items else 0

    # ---- PopularSource -------------------------------------------------------------------------------------------
    def most_active(self, k: int, as_of_ms: int) -> list[int]:
        return self.leaderboard.top(k)

    def profile_views(self, user: int) -> Mapping[int, tuple[int, int, int]]:
        return MappingProxyType(self._view_summary.get(user, {}))  # read-only: the held summary itself

    # ItemEngagementSource
    def engaged_items(self, user: int) -> Collection[int]:
        return self.engaged.get(user, {}).keys()

    def item_engagers(self, item: int) -> Collection[int]:
        engagers = self.engagers.get(item, _NO_NEIGHBOURS)
        fanout = self.max_item_fanout
        return engagers if fanout is None or len(engagers) <= fanout else _NO_NEIGHBOURS

    def item_stamp(self, item: int) -> int:
        return self._item_stamp.get(item, 0)

    def co_engaged_counts(self, user: int) -> dict[int, int]:
        fanout = self.max_item_fanout
        # a hub item says little about two people (the worker's rule); Counter counts in C, keys in first-seen order
        counts = Counter(chain.from_iterable(
            engagers for engagers in map(self.engagers.__getitem__, self.engaged.get(user, {}))
            if fanout is None or len(engagers) <= fanout))
        counts.pop(user, None)
        return counts

    def dismissed(self, user: int) -> dict[int, int]:
        return self.dismissals.get(user, {})

    def blocked(self, user: int) -> Collection[int]:
        return self.blocks.get(user, _NO_NEIGHBOURS)

    def embedding(self, user: int) -> np.ndarray | None:
        return self.vectors.get(user)

    def _embedding_matrix(self) -> tuple[np.ndarray, np.ndarray, dict[int, int]]:
        """(ids, rows, user → row) of every stored embedding, rebuilt after a change (one gather per candidate
        list instead of a Python step per candidate)."""
        if self._matrix is None:
            ids = np.fromiter(self.vectors.keys(), np.int64, len(self.vectors))
            rows = np.stack(list(self.vectors.values())) if len(ids) else np.empty((0, self.dim), np.float32)
            self._matrix = (ids, rows, {user: i for i, user in enumerate(ids.tolist())})
        return self._matrix

    def embeddings(self, users: Sequence[int]) -> np.ndarray:
        _, rows, row_of = self._embedding_matrix()
        index = np.fromiter(map(row_of.get, users, repeat(-1)), np.int64, len(users))
        out = rows[index] if len(rows) else np.empty((len(users), self.dim), np.float32)
        out[index < 0] = np.nan
        return out

    def ann_neighbours(self, user: int, k: int, exclude: Collection[int]) -> list[tuple[int, float]]:
        if self.ann is not None:
            return list(self.ann(user, k, exclude))
        query = self.vectors.get(user)
        if query is None or k <= 0:
            return []
        ids, rows, _ = self._embedding_matrix()
        # einsum, not @: a BLAS matrix-vector product may spread over threads (CPU that a thread's clock misses)
        scores = np.einsum("ij,j->i", rows, query)
        allowed = ids != user
        if exclude:
            allowed &= ~ids_in(ids, np.fromiter(exclude, np.int64, len(exclude)))
        index = np.flatnonzero(allowed)
        if len(index) > k:
            index = index[np.argpartition(-scores[index], k - 1)[:k]]
        index = index[np.lexsort((ids[index], -scores[index]))]
        return list(zip(ids[index].tolist(), scores[index].astype(np.float64).tolist(), strict=True))


class _ProfileMap(dict[int, Profile]):
    """MemorySource's profiles by user: a dict (reads at C speed) that reports every write and removal, so the
    source's profile identity column (:class:`~pymk.ranking.source.ProfileIdentitySource`) never goes stale."""

    def __init__(self, written: Callable[[int, Profile | None], None]) -> None:
        super().__init__()
        self._written = written

    def __setitem__(self, user: int, profile: Profile) -> None:
        super().__setitem__(user, profile)
        self._written(user, profile)

    def __delitem__(self, user: int) -> None:
        super().__delitem__(user)
        self._written(user, None)

    def pop(self, user: int, *default: Any) -> Any:
        present = user in self
        value = super().pop(user, *default)
        if present:
            self._written(user, None)
        return value

    def setdefault(self, user: int, profile: Profile) -> Profile:  # type: ignore[override]
        if user not in self:
            self[user] = profile
        return self[user]

    def update(self, *args: Any, **kwargs: Any) -> None:
        for user, profile in dict(*args, **kwargs).items():
            self[user] = profile

    def popitem(self) -> tuple[int, Profile]:
        user, profile = super().popitem()
        self._written(user, None)
        return user, profile

    def clear(self) -> None:
        for user in list(self):
            del self[user]

    def __reduce_ex__(self, protocol: Any) -> Any:
        # the identity column holds this process's id()s: a copy in another process would compare stale numbers
        raise TypeError("a MemorySource's profiles cannot be pickled (their identity column is per process)")
