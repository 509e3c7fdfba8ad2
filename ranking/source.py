"""What the ranking code reads, as two protocols: the state of the world (:class:`RankingSource`) and a
scorer of feature rows (:class:`Scorer`).

The worker implements :class:`RankingSource` over its RocksDB state; :class:`pymk.ranking.memory_source.MemorySource`
implements it over plain dicts for training, tests and offline evaluation. Ranking code reads nothing else,
so the same code ranks online and offline.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np

from pymk.events import Profile
from pymk.features.activity import TIME_CONSTANTS_MS
from pymk.features.graph import TwoHopArrays

EMBEDDING_DIM = 128
# Time constants of the decayed connection activity (:class:`ActivitySource`): a day, a week, a month, the
# scales of "daily / weekly / monthly active"; the model picks the one that predicts on each graph.
ACTIVITY_TIME_CONSTANTS_MS: tuple[int, ...] = TIME_CONSTANTS_MS


class SourceNotReady(Exception):  # noqa: N818 - a state, not a failure: "ask again later"
    """A source cannot answer a question of ranking yet (e.g. a sharded ANN answer gathered for other exclusions
    or another query vector than the user's now): the caller leaves the list owed and asks again later, rather
    than ranking from a partial answer."""


@runtime_checkable
class RankingSource(Protocol):
    def neighbours(self, user: int) -> Collection[int]:
        """The user's current connections."""
        ...

    def two_hop(self, user: int) -> tuple[Mapping[int, int], Mapping[int, float]]:
        """Every user at distance exactly 2 → common-neighbour count, and → exact Adamic-Adar (Σ 1/ln deg(z)
        over the common neighbours z, with their current degrees; degree-1 neighbours contribute 0)."""
        ...

    def common_neighbors(self, user: int, candidate: int) -> Sequence[int]:
        ...

    def degree(self, user: int) -> int:
        ...

    def profile(self, user: int) -> Profile | None:
        ...

    def profile_views(self, user: int) -> Mapping[int, tuple[int, int, int]]:
        """other → (distinct views user→other, distinct views other→user, ts of the latest view either way),
        only for users with at least one view either way."""
        ...

    def co_engaged_counts(self, user: int) -> Mapping[int, int]:
        """other → number of content items both engaged with (only users sharing at least one)."""
        ...

    def dismissed(self, user: int) -> Mapping[int, int]:
        """candidate → ts of the user's latest dismissal of it."""
        ...

    def blocked(self, user: int) -> Collection[int]:
        ...

    def embedding(self, user: int) -> np.ndarray | None:
        """(EMBEDDING_DIM,) float32, L2-normalised; None when the user has no embedding."""
        ...

    def embeddings(self, users: Sequence[int]) -> np.ndarray:
        """(len(users), EMBEDDING_DIM); a row of NaN for a user without an embedding."""
        ...

    def ann_neighbours(self, user: int, k: int, exclude: Collection[int]) -> Sequence[tuple[int, float]]:
        """Up to k (user, cosine) pairs, best first, none in ``exclude``; [] when the user has no embedding. May
        raise :class:`SourceNotReady`."""
        ...


@runtime_checkable
class ActivitySource(Protocol):
    """Optional extension of :class:`RankingSource`: how recently and how much users connect.

    On message-like graphs the people who connect next are the ones connecting now (on CollegeMsg "new
    connections in the last days" ranks future partners far better than all-time degree). Both are functions
    of the user's edge registers (:mod:`pymk.features.activity`), so the worker keeps them exactly and
    idempotently and publishes them with the degree for every other worker:

    * decayed activity, per time constant τ in :data:`ACTIVITY_TIME_CONSTANTS_MS`: Σ exp(−(as_of − tsₑ)/τ)
      over the user's alive connections e, tsₑ the time of the event that (last) made the edge. Kept as the
      values at an anchor (the latest register ts) and read with
      :func:`~pymk.features.activity.activity_at`.
    * the ts of the user's latest connection change (add or remove): the anchor.
    """

    def connection_activity(self, user: int, as_of_ms: int) -> Sequence[float]:
        """Decayed counts of the user's connection adds as of ``as_of_ms``, one per time constant of
        :data:`ACTIVITY_TIME_CONSTANTS_MS` (zeros for a user who never connected)."""
        ...

    def last_connection_ts(self, user: int) -> int | None:
        """ts of the user's latest connection add or remove; None when there was none."""
        ...


class ActivityTable(NamedTuple):
    """What :class:`ActivityTableSource` returns for a list of users: the held activity, not yet decayed."""

    values: np.ndarray  # (n, len(ACTIVITY_TIME_CONSTANTS_MS)) float64, the decayed counts at each user's anchor
    anchors: np.ndarray  # (n,) int64, the anchor = ts of the user's latest connection change (0 when unknown)
    known: np.ndarray  # (n,) bool, False for a user who never connected (values 0, no anchor)


@runtime_checkable
class ActivityTableSource(Protocol):
    """Optional, with :class:`ActivitySource`: the held activity of many users in one call (Stage 2 reads it for
    every candidate; one Python call per candidate was the largest part of the feature matrix). The matrix then
    decays the values exactly as :func:`~pymk.features.activity.activity_at` does, so both paths give the same
    bits."""

    def activity_table(self, users: Sequence[int]) -> ActivityTable:
        ...


@runtime_checkable
class BatchReadSource(Protocol):
    """Optional: degrees and profiles of many users in one call, the same values as :meth:`RankingSource.degree`
    and :meth:`RankingSource.profile` (the feature matrix reads them for every candidate)."""

    def many_degrees(self, users: Sequence[int]) -> np.ndarray:
        """(len(users),) int64."""
        ...

    def many_profiles(self, users: Sequence[int]) -> list[Profile | None]:
        ...


@runtime_checkable
class IdArraySource(Protocol):
    """Optional: the batch reads of the feature matrix keyed by an int64 id array, the same values as
    :meth:`BatchReadSource.many_degrees`, :meth:`BatchReadSource.many_profiles`,
    :meth:`ActivityTableSource.activity_table` and :meth:`RankingSource.embeddings`. Right after Stage 1's
    traversal a dict lookup per candidate mostly waits on cold memory; a source holding its users in columns
    answers with a binary search and a gather instead."""

    def degrees_of(self, ids: np.ndarray) -> np.ndarray:
        """(len(ids),) int64."""
        ...

    def profiles_of(self, ids: np.ndarray) -> list[Profile | None]:
        ...

    def activity_table_of(self, ids: np.ndarray) -> ActivityTable:
        ...

    def embeddings_of(self, ids: np.ndarray) -> np.ndarray:
        ...


@runtime_checkable
class ProfileIdentitySource(Protocol):
    """Optional, with :class:`IdArraySource`: which profile object each user holds now, as its ``id()`` (``id(None)``
    without one), in one gather. The feature matrix's profile cache parsed most candidates' profiles before; it
    compares these identities with the objects it parsed and fetches only the users whose differ, instead of
    2,000 profile objects a list. The source keeps each current profile object alive, so an equal id is the same
    object."""

    def profile_identities_of(self, ids: np.ndarray) -> np.ndarray:
        """(len(ids),) uint64."""
        ...

    def profiles_of(self, ids: np.ndarray) -> list[Profile | None]:
        ...


@runtime_checkable
class TwoHopArraySource(Protocol):
    """Optional: :meth:`RankingSource.two_hop` and :meth:`ResourceAllocationSource.two_hop_resource_allocation` as
    arrays ordered by id, the same values (Stage 1 works on arrays; building the maps cost a Python step per
    2-path, and reading them back another per candidate)."""

    def two_hop_arrays(self, user: int) -> TwoHopArrays:
        ...


@runtime_checkable
class ChangeStampSource(Protocol):
    """Optional: what changed since an earlier read, so that a kept list (ranking/incremental.py) re-reads only the
    rows that moved instead of every candidate's degree, activity and embedding at every event. A stamp is a
    counter that every change of the state moves forward (never back)."""

    def change_stamp(self) -> int:
        """The stamp now: a later change has a larger one."""
        ...

    def stamp_handles(self, ids: np.ndarray) -> np.ndarray:
        """Handles of the users ``ids`` for :meth:`changed_since` (looked up once; a kept list holds them while its
        rows stay), valid for as long as the state behind the source lives (the worker makes a source per list; its
        handles are fact slots, dropped with the kept lists when its partitions change)."""
        ...

    def changed_since(self, handles: np.ndarray, stamp: int, part: str) -> np.ndarray:
        """(len(handles),) bool: whether each user's ``part`` changed after ``stamp``: "graph" (its degree or
        connection activity), "embedding" or "profile" (a user unknown when its handle was taken: whether any user
        appeared since)."""
        ...

    def views_stamp(self, user: int) -> int:
        """The stamp of the latest change of the user's :meth:`RankingSource.profile_views` (a view either way);
        0 when none."""
        ...

    def co_engagement_stamp(self, user: int) -> int:
        """The stamp of the latest change that can move the user's :meth:`RankingSource.co_engaged_counts` (an
        engagement of an item the user engaged, the user's own included); 0 when none."""
        ...


@runtime_checkable
class ItemEngagementSource(Protocol):
    """Optional, with :class:`ChangeStampSource`: the items behind :meth:`RankingSource.co_engaged_counts`, so a kept
    list whose co-engagement stamp moved recounts only the users of the items that moved (an engagement moves one
    item's engagers) instead of the whole map. ``co_engaged_counts(u)[v]`` must equal the number of
    ``engaged_items(u)`` whose ``item_engagers`` hold ``v`` (``v`` ≠ ``u``), and every change of an item's engagers
    must move its ``item_stamp`` past the co-engagement stamp of each user engaged with it."""

    def engaged_items(self, user: int) -> Collection[int]:
        """The items the user engaged with."""
        ...

    def item_engagers(self, item: int) -> Collection[int]:
        """The users counted as the item's engagers (none for an item the co-engagement counts leave out: a hub)."""
        ...

    def item_stamp(self, item: int) -> int:
        """The stamp of the latest change of the item's engagers (0 when none); at most the co-engagement stamp of
        a user engaged with it."""
        ...


@runtime_checkable
class AnnStampSource(Protocol):
    """Optional, with :class:`ChangeStampSource`: whether an ANN answer may have moved. Any user's embedding moving
    (inserted, moved, deleted) may change anyone's :meth:`RankingSource.ann_neighbours`; a kept list asks again
    when this stamp moved since its last ask and changes its ANN rows in place when the answer differs."""

    def ann_stamp(self) -> int:
        """The stamp of the latest change of any embedding (0 when none)."""
        ...


@runtime_checkable
class ResourceAllocationSource(Protocol):
    """Optional extension of :class:`RankingSource`: resource allocation over the 2-hop set, the best single
    heuristic on the reference graphs of random splits (ego-Facebook, CA-HepPh)."""

    def two_hop_resource_allocation(self, user: int) -> Mapping[int, float]:
        """Every user at distance exactly 2 → Σ 1/deg(z) over the common neighbours z (current degrees): the
        same traversal as :meth:`RankingSource.two_hop` with weight 1/deg instead of 1/ln deg."""
        ...


class EgoAdjacency(NamedTuple):
    """What :class:`EgoAdjacencySource` returns: a user's neighbours and each one's alive neighbours, the rows a
    2-hop traversal reads (the worker holds them as mirrors)."""

    middles: np.ndarray  # (m,) int64, the user's neighbours, ascending
    sizes: np.ndarray  # (m,) int64, each neighbour's degree (the length of its run in ``others``)
    others: np.ndarray  # (Σ sizes,) int64, the neighbours' neighbours, neighbour after neighbour (any order within)

    @classmethod
    def empty(cls) -> EgoAdjacency:
        return cls(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.int64))


@runtime_checkable
class EgoAdjacencySource(Protocol):
    """Optional: the adjacency of the user's neighbours, from which the feature matrix computes the structure of
    the common neighbours beyond their count (:func:`pymk.ranking.features.structure_columns`): how many of
    each degree band, the smallest and largest degree, and the 3-paths that run inside the user's circle."""

    def ego_adjacency(self, user: int) -> EgoAdjacency:
        ...


@runtime_checkable
class PopularSource(Protocol):
    """Optional extension of :class:`RankingSource`: the most active users, a third Stage 1 source
    (``popular``). On sparse message graphs (Digg replies) most future partners are neither 2-hop nor
    embedding neighbours but busy users; ranking by recent activity is the strongest single signal there."""

    def most_active(self, k: int, as_of_ms: int) -> Sequence[int]:
        """The k users with the highest 7-day activity (:class:`ActivitySource`, the time constant
        ``ACTIVITY_TIME_CONSTANTS_MS[1]``), best first (ties: higher degree, lower id); only users with an
        alive connection. The order is that of :func:`~pymk.features.activity.activity_rank_key`, the same at
        every ``as_of_ms`` after the users' last changes (decay multiplies everyone by the same factor)."""
        ...


@runtime_checkable
class Scorer(Protocol):
    """Scores feature rows (columns in :data:`pymk.ranking.features.FEATURE_NAMES` order); higher is better."""

    @property
    def version(self) -> str:
        """Published as the recommendations' ``model_version``."""
        ...

    def predict(self, features: np.ndarray) -> np.ndarray:
        """(n,) scores of (n, 17) feature rows."""
        ...

    def explain(self, features: np.ndarray) -> np.ndarray:
        """(n, 17) additive per-feature contributions to the score (or its margin), for the reasons."""
        ...
