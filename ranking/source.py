"""What the ranking code reads, as two protocols: the state of the world (:class:`RankingSource`) and a
scorer of feature rows (:class:`Scorer`).

The worker implements :class:`RankingSource` over its RocksDB state; :class:`pymk.ranking.memory_source.MemorySource`
implements it over plain dicts for training, tests and offline evaluation. Ranking code reads nothing else,
so the same code ranks online and offline.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from pymk.events import Profile

EMBEDDING_DIM = 128
DAY_MS = 86_400_000
# Time constants of the decayed connection activity (:class:`ActivitySource`): a day, a week, a month, the
# scales of "daily / weekly / monthly active"; the model picks the one that predicts on each graph.
ACTIVITY_TIME_CONSTANTS_MS: tuple[int, ...] = (DAY_MS, 7 * DAY_MS, 30 * DAY_MS)


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
        """Up to k (user, cosine) pairs, best first, none in ``exclude``; [] when the user has no embedding."""
        ...


@runtime_checkable
class ActivitySource(Protocol):
    """Optional extension of :class:`RankingSource`: how recently and how much users connect.

    On message-like graphs the people who connect next are the ones connecting now (on CollegeMsg "new
    connections in the last days" ranks future partners far better than all-time degree). Both values can be
    kept per user in O(1) state updated on every connection event, so a worker can serve them for any user:

    * decayed activity, per time constant τ in :data:`ACTIVITY_TIME_CONSTANTS_MS`: a = Σ exp(−(as_of − tsᵢ)/τ)
      over the user's connection adds i (removals do not count: activity, not degree). Kept as (value,
      last_ts): on an add at ts ≥ last_ts, value = value·exp(−(ts − last_ts)/τ) + 1, last_ts = ts; on an add
      at ts < last_ts (out of order), value += exp(−(last_ts − ts)/τ). Read as value·exp(−(as_of − last_ts)/τ)
      (value itself when as_of < last_ts).
    * the ts of the user's latest connection change (add or remove).
    """

    def connection_activity(self, user: int, as_of_ms: int) -> Sequence[float]:
        """Decayed counts of the user's connection adds as of ``as_of_ms``, one per time constant of
        :data:`ACTIVITY_TIME_CONSTANTS_MS` (zeros for a user who never connected)."""
        ...

    def last_connection_ts(self, user: int) -> int | None:
        """ts of the user's latest connection add or remove; None when there was none."""
        ...


@runtime_checkable
class ResourceAllocationSource(Protocol):
    """Optional extension of :class:`RankingSource`: resource allocation over the 2-hop set, the best single
    heuristic on the reference graphs of random splits (ego-Facebook, CA-HepPh)."""

    def two_hop_resource_allocation(self, user: int) -> Mapping[int, float]:
        """Every user at distance exactly 2 → Σ 1/deg(z) over the common neighbours z (current degrees): the
        same traversal as :meth:`RankingSource.two_hop` with weight 1/deg instead of 1/ln deg."""
        ...


@runtime_checkable
class PathCountSource(Protocol):
    """Optional extension of :class:`RankingSource`: paths of length 3 between the user and candidates, a
    Katz-like term that sees past the common neighbours (the local path index A² + εA³ beats RA on several
    graphs). A worker can compute it from what it holds: paths₃(u, c) = Σ_{w ∈ N(c)} |N(u) ∩ N(w)|, with
    N(c) from the candidate's mirror and |N(u) ∩ N(w)| from the user's 2-hop counts (w at distance 2) or its
    neighbours' rows (w a neighbour)."""

    def paths_of_length_three(self, user: int, candidates: Sequence[int]) -> Sequence[int]:
        """The (u, c) entry of A³ (walks u – x – w – c of length 3) for each candidate c, in order."""
        ...


@runtime_checkable
class PopularSource(Protocol):
    """Optional extension of :class:`RankingSource`: the most active users, a third Stage 1 source
    (``popular``). On sparse message graphs (Digg replies) most future partners are neither 2-hop nor
    embedding neighbours but busy users; ranking by recent activity is the strongest single signal there."""

    def most_active(self, k: int, as_of_ms: int) -> Sequence[int]:
        """The k users with the highest 7-day activity (:class:`ActivitySource`, the time constant
        ``ACTIVITY_TIME_CONSTANTS_MS[1]``) as of ``as_of_ms``, best first (ties: higher degree, lower id);
        only users with a connection."""
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
