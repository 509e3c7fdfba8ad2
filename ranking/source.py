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
