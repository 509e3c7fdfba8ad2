"""The worker's state seen through the protocols of the pure code: :class:`RankingSource` (ranking/) for a
local query user, and the neighbour / node-feature sources of the GraphSAGE embedder (index/).

Everything read here is local to the worker: the user's own rows in its partition's RocksDB, mirrors of its
neighbours' adjacency (so 2-hop traversal is local), every user's degree and profile from ``user-globals``,
and every user's embedding from the worker's copy of the global index.

Change stamps (:class:`~pymk.ranking.source.ChangeStampSource`), so that a kept list (ranking/incremental.py)
re-reads only the candidates whose facts moved: a candidate's degree, activity and profile are stamped by the
worker's fact slots (streams/user_facts.py: invalidated by ``Refresher.collect`` for local users and by every
``user-globals`` record for the others), its embedding by the index's listener (every apply, upsert and delete of
streams/global_index.py), the owner's views and co-engagements by its partition's behaviour store
(features/behaviour.py). The handles are fact slots, which outlive a source (one per list) until the worker drops
its slots, and its kept lists with them, at a change of partitions. Without fact slots every row reads as changed.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import numpy as np

from pymk.events import Profile
from pymk.features.activity import TIME_CONSTANTS_MS, activity_at
from pymk.features.change_clock import CHANGE_CLOCK
from pymk.features.graph import Registers, TwoHopArrays, is_alive
from pymk.ranking.candidates import GRAPH, Candidate, CandidateSet
from pymk.ranking.features import FeatureBuilder, feature_dict
from pymk.ranking.id_index import ids_in
from pymk.ranking.source import ActivityTable, EgoAdjacency
from pymk.streams.global_index import GlobalIndex
from pymk.streams.state import PartitionState
from pymk.streams.user_facts import UserFacts

DegreeOf = Callable[[int], int]  # any user's current degree
ProfileOf = Callable[[int], Profile | None]  # any user's current profile
ActivityOf = Callable[[int], tuple[tuple[float, ...], int] | None]
MostActiveOf = Callable[[int], list[int]]  # the k most active users of the whole graph, best first
AnnSearch = Callable[[int, int, Collection[int]], Sequence[tuple[int, float]]]  # (user, k, exclude) → pairs


class PartitionGraphView:
    """Neighbours of a partition's local users and of their neighbours (mirrors), for neighbour sampling.
    A node further away (the second hop's far end) is only ever asked for its features, never its neighbours."""

    def __init__(self, state: PartitionState) -> None:
        self.graph = state.graph

    def neighbours(self, user: int) -> Sequence[int]:
        row = self.graph.mirror_row(user)
        return [n for n, v in row.versions.items() if is_alive(v)]

    def neighbour_array(self, user: int) -> np.ndarray:
        """:meth:`neighbours` as the row's kept array (made once per change of the row, not per read)."""
        return self.graph.mirror_row(user).alive_ids()


class WorkerNodeFeatures:
    """The embedder's reads of any user's degree and profile; with ``facts``, the nodes of a batch are read in
    one gather from the worker's fact slots (streams/user_facts.py) instead of two calls per node. Facts are
    valid for what the refresher collected (``Refresher.collect`` invalidates the users that changed)."""

    def __init__(self, degree_of: DegreeOf, profile_of: ProfileOf, facts: UserFacts | None = None) -> None:
        self.degree_of = degree_of
        self.profile_of = profile_of
        self.facts = facts

    def profile(self, user: int) -> Profile | None:
        return self.profile_of(user)

    def degree(self, user: int) -> int:
        return self.degree_of(user)

    def profiles_and_degrees(self, ids: np.ndarray) -> tuple[list[Profile | None], np.ndarray]:
        """The profiles and degrees of an int64 id array, in its order."""
        if self.facts is not None:
            return self.facts.profiles_and_degrees_of(ids)
        users = ids.tolist()
        return list(map(self.profile_of, users)), np.fromiter(map(self.degree_of, users), np.int64, len(users))


class WorkerRankingSource:
    """:class:`pymk.ranking.source.RankingSource` for the local users of one partition."""

    def __init__(self, state: PartitionState, index: GlobalIndex, degree_of: DegreeOf, profile_of: ProfileOf,
                 activity_of: ActivityOf, most_active_of: MostActiveOf,
                 blocked: Mapping[int, Collection[int]] | None = None, ann: AnnSearch | None = None,
                 facts: UserFacts | None = None) -> None:
        self.activity_of = activity_of
        self.facts = facts  # the candidates' degree, activity and profile in one gather (streams/user_facts.py)
        self.state = state
        self.graph = state.graph
        self.behaviour = state.behaviour
        self.index = index
        self.degree_of = degree_of
        self.profile_of = profile_of
        self.most_active_of = most_active_of
        self.ann = ann  # Stage 1's ANN when not the GraphSAGE index (the two-tower space)
        self._blocked = blocked or {}
        # The last two_hop traversal: Stage 1 and the feature builder read it one after the other. A source lives
        # for one ranking pass, in which the state does not change.
        self._two_hop: tuple[int, TwoHopArrays] | None = None
        self._allocation: tuple[int, dict[int, float]] | None = None
        self._neighbour_rows: tuple[int, list[tuple[int, Registers]]] | None = None  # for the shown items' reasons
        # the structure columns of the logged rows read it twice a list (the shown 20, then the unshown sample)
        self._ego: tuple[int, EgoAdjacency] | None = None

    def neighbours(self, user: int) -> Collection[int]:
        return self.graph.neighbours(user).keys()

    def visible_neighbours(self, node: int) -> np.ndarray:
        """``node``'s neighbours as this partition holds them (its own row, or the mirror of a local user's
        neighbour; empty otherwise): the cross-attention re-ranker samples any node's, not only local users'."""
        return self.graph.mirror_row(node).alive_ids()

    # TwoHopArraySource
    def two_hop_arrays(self, user: int) -> TwoHopArrays:
        """The users at distance exactly 2 (the contract of :meth:`RankingSource.two_hop`): the partition's
        traversal also reaches the user's neighbours that share a neighbour with it (a triangle), dropped here."""
        if self._two_hop is None or self._two_hop[0] != user:
            held = self.graph.two_hop_arrays(user)
            if len(held.ids):
                neighbours = self.graph.adjacency_row(user).alive_ids()
                keep = ~ids_in(held.ids, neighbours) if len(neighbours) else None
                if keep is not None and not keep.all():
                    held = TwoHopArrays(held.ids[keep], held.counts[keep], held.adamic_adar[keep],
                                        held.resource_allocation[keep])
            self._two_hop = (user, held)
        return self._two_hop[1]

    def two_hop(self, user: int) -> tuple[Mapping[int, int], Mapping[int, float]]:
        held = self.two_hop_arrays(user)
        ids = held.ids.tolist()
        return dict(zip(ids, held.counts.tolist(), strict=True)), dict(zip(ids, held.adamic_adar.tolist(), strict=True))

    # ResourceAllocationSource
    def two_hop_resource_allocation(self, user: int) -> Mapping[int, float]:
        if self._allocation is None or self._allocation[0] != user:
            held = self.two_hop_arrays(user)
            self._allocation = (user, dict(zip(held.ids.tolist(), held.resource_allocation.tolist(), strict=True)))
        return self._allocation[1]

    # EgoAdjacencySource: the neighbours' mirrored rows, as the 2-hop traversal reads them
    def ego_adjacency(self, user: int) -> EgoAdjacency:
        if self._ego is not None and self._ego[0] == user:
            return self._ego[1]
        rows = self.graph.neighbour_rows(user)
        if not rows:
            ego = EgoAdjacency.empty()
        else:
            neighbours = [row.alive_ids() for _, row in rows]
            ego = EgoAdjacency(np.fromiter((z for z, _ in rows), np.int64, len(rows)),
                               np.fromiter(map(len, neighbours), np.int64, len(rows)), np.concatenate(neighbours))
        self._ego = (user, ego)
        return ego

    # PopularSource: from user-globals, every user's activity (the order does not depend on as_of)
    def most_active(self, k: int, as_of_ms: int) -> Sequence[int]:
        return self.most_active_of(k)

    def common_neighbors(self, user: int, candidate: int) -> Sequence[int]:
        """:meth:`PartitionGraph.common_neighbors` (by id), with the user's neighbour rows read once per list."""
        if self._neighbour_rows is None or self._neighbour_rows[0] != user:
            self._neighbour_rows = (user, self.graph.neighbour_rows(user))
        return [z for z, row in self._neighbour_rows[1] if row.versions.get(candidate, 1) % 2 == 0]

    def degree(self, user: int) -> int:
        return self.degree_of(user)

    def profile(self, user: int) -> Profile | None:
        return self.profile_of(user)

    # BatchReadSource: the same reads without a generator step per candidate
    def many_degrees(self, users: Sequence[int]) -> np.ndarray:
        if self.facts is not None:
            return self.facts.degrees(users)
        return np.fromiter(map(self.degree_of, users), np.int64, len(users))

    def many_profiles(self, users: Sequence[int]) -> list[Profile | None]:
        if self.facts is not None:
            return self.facts.profiles(users)
        return list(map(self.profile_of, users))

    # IdArraySource: the same reads keyed by Stage 1's id array
    def degrees_of(self, ids: np.ndarray) -> np.ndarray:
        if self.facts is not None:
            return self.facts.degrees_of(ids)
        return self.many_degrees(ids.tolist())

    def profiles_of(self, ids: np.ndarray) -> list[Profile | None]:
        if self.facts is not None:
            return self.facts.profiles_of(ids)
        return self.many_profiles(ids.tolist())

    def profile_identities_of(self, ids: np.ndarray) -> np.ndarray:  # ProfileIdentitySource
        if self.facts is not None:
            return self.facts.profile_identities_of(ids)
        profiles = self.profiles_of(ids)
        return np.fromiter(map(id, profiles), np.uint64, len(profiles))

    def activity_table_of(self, ids: np.ndarray) -> ActivityTable:
        if self.facts is not None:
            return self.facts.activity_of(ids)
        return self.activity_table(ids.tolist())

    def embeddings_of(self, ids: np.ndarray) -> np.ndarray:
        return self.index.vectors(ids.tolist())

    def profile_views(self, user: int) -> Mapping[int, tuple[int, int, int]]:
        out: dict[int, tuple[int, int, int]] = {}
        for other, (viewed, viewed_by) in self.behaviour.profile_view_counts(user).items():
            latest = self.behaviour.last_view_between(user, other)
            out[other] = (viewed, viewed_by, latest if latest is not None else 0)
        return out

    def co_engaged_counts(self, user: int) -> Mapping[int, int]:
        return self.behaviour.co_engaged_counts(user)

    def dismissed(self, user: int) -> Mapping[int, int]:
        out: dict[int, int] = {}
        for candidate in self.behaviour.dismissed_candidates(user):
            _, ts = self.behaviour.dismissed(user, candidate)
            out[candidate] = ts if ts is not None else 0
        return out

    # ActivitySource: exact for local users (their registers), from user-globals for the others
    def _activity(self, user: int) -> tuple[tuple[float, ...], int] | None:
        if self.graph.partition_of(user) == self.graph.partition:
            return self.graph.connection_activity(user)
        return self.activity_of(user)

    def activity_table(self, users: Sequence[int]) -> ActivityTable:
        if self.facts is not None:
            return self.facts.activity(users)
        held = list(map(self._activity, users))
        known = np.fromiter((h is not None for h in held), bool, len(held))
        values = np.zeros((len(held), len(TIME_CONSTANTS_MS)))
        anchors = np.zeros(len(held), np.int64)
        if known.any():
            present = [h for h in held if h is not None]
            values[known] = [v for v, _ in present]
            anchors[known] = [a for _, a in present]
        return ActivityTable(values, anchors, known)

    def connection_activity(self, user: int, as_of_ms: int) -> Sequence[float]:
        held = self._activity(user)
        if held is None:
            return (0.0,) * len(TIME_CONSTANTS_MS)
        return activity_at(held[0], held[1], as_of_ms)

    def last_connection_ts(self, user: int) -> int | None:
        held = self._activity(user)
        return None if held is None else held[1]

    def blocked(self, user: int) -> Collection[int]:
        return self._blocked.get(user, ())

    def embedding(self, user: int) -> np.ndarray | None:
        return self.index.vector(user)

    def embeddings(self, users: Sequence[int]) -> np.ndarray:
        return self.index.vectors(users)

    def ann_neighbours(self, user: int, k: int, exclude: Collection[int]) -> Sequence[tuple[int, float]]:
        if self.ann is not None:
            return self.ann(user, k, exclude)
        return self.index.neighbours(user, k, set(exclude))

    # ChangeStampSource (module doc)
    def change_stamp(self) -> int:
        return CHANGE_CLOCK.now()

    def stamp_handles(self, ids: np.ndarray) -> np.ndarray:
        if self.facts is None:
            return np.zeros(len(ids), np.int64)
        return self.facts.slots_of(np.asarray(ids, np.int64)).copy()

    def changed_since(self, handles: np.ndarray, stamp: int, part: str) -> np.ndarray:
        if self.facts is None:  # nothing stamps the reads: every row may have moved
            return np.ones(len(handles), bool)
        return self.facts.changed_since(handles, stamp, part)

    def ann_stamp(self) -> int:  # AnnStampSource: the index's latest change, as the fact slots heard it
        return self.facts.embeddings_stamp if self.facts is not None else CHANGE_CLOCK.tick()

    def views_stamp(self, user: int) -> int:
        return self.behaviour.views_stamp(user)

    def co_engagement_stamp(self, user: int) -> int:
        return self.behaviour.co_engagement_stamp(user)

    # ItemEngagementSource
    def engaged_items(self, user: int) -> Collection[int]:
        return self.behaviour.engaged_items(user)

    def item_engagers(self, item: int) -> Collection[int]:
        return self.behaviour.item_engagers(item)

    def item_stamp(self, item: int) -> int:
        return self.behaviour.item_stamp(item)

    def describe(self) -> dict[str, Any]:
        return {"partition": self.state.partition}


def pair_feature_row(source: WorkerRankingSource, user: int, candidate: int, as_of_ms: int,
                     builder: FeatureBuilder | None = None) -> dict[str, float | None]:
    """The ranking feature matrix's row of one pair, as Stage 2 builds it when ``candidate`` is in ``user``'s
    list: its common-neighbour count and Adamic-Adar from Stage 1's traversal (0 beyond distance 2), every
    other column from the same builder and source, as of ``as_of_ms``. The debug API's ``/features/{u}/{v}``
    answers with it, so what a person reads there is what the ranker saw."""
    held = source.two_hop_arrays(user)
    at = int(np.searchsorted(held.ids, candidate))
    found = at < len(held.ids) and int(held.ids[at]) == candidate
    pair = Candidate(candidate, (GRAPH,), int(held.counts[at]) if found else 0,
                     float(held.adamic_adar[at]) if found else 0.0, None)
    row = (builder or FeatureBuilder()).matrix(user, CandidateSet.from_candidates(user, [pair]), source, as_of_ms)
    return feature_dict(row[0])
