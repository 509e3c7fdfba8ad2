"""Stage 1's ANN in the two-tower space: every embedded user's candidate-tower vector in an HNSW index, searched
with the query user's query-tower vector (``PYMK_ANN_SPACE=two-tower``).

The GraphSAGE index answers "who is embedded near me"; the towers were trained to answer "who will I connect
with", so their space is the better retrieval space when a two-tower model exists. The index is derived state:
nothing is persisted. It is rebuilt from the GraphSAGE vectors when the two-tower model version changes (and at
a worker's first use), and a user's candidate vector is recomputed when their GraphSAGE embedding changes
(:meth:`TowerSpaceIndex.mark`), in one batch before the next search. The candidate tower also reads the user's
degree and profile; those are taken at the time of that recomputation (an embedding is recomputed whenever a
user's adjacency or profile changes, so they move together, up to the re-embedding debounce).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import replace
from typing import Protocol

import numpy as np

from pymk.index.ann import AnnConfig, AnnIndex


class CandidateTower(Protocol):
    """What the index needs of a two-tower model (:class:`pymk.ranking.two_tower.TwoTowerRanker` is one)."""

    @property
    def version(self) -> str: ...

    def query_vector(self, user: int, source: object) -> np.ndarray: ...

    def candidate_vectors(self, users: Sequence[int] | np.ndarray, source: object) -> np.ndarray: ...


class TowerSpaceIndex:
    def __init__(self, config: AnnConfig, dim: int = 64, batch: int = 4096) -> None:
        self.config = replace(config, dim=dim)
        self.index = AnnIndex(self.config)
        self.model_version: str | None = None
        self.batch = batch
        self._dirty: set[int] = set()
        self._deleted: set[int] = set()
        self.recomputed = 0  # candidate vectors computed since start (for /stats)

    def __len__(self) -> int:
        return len(self.index)

    def mark(self, users: Iterable[int], deleted: bool = False) -> None:
        """These users' GraphSAGE embeddings changed (or were deleted): recompute before the next search."""
        for user in users:
            if deleted:
                self._deleted.add(int(user))
                self._dirty.discard(int(user))
            else:
                self._dirty.add(int(user))
                self._deleted.discard(int(user))

    def sync(self, tower: CandidateTower, source: object, all_users: Callable[[], Collection[int]]) -> int:
        """Bring the index up to date with the model and the marked users; returns how many were recomputed.
        ``all_users``: every embedded user (read only when the model changed, for a full rebuild)."""
        if tower.version != self.model_version:
            self.index = AnnIndex(self.config)
            self.model_version = tower.version
            self._dirty = {int(u) for u in all_users()}
            self._deleted.clear()
        if self._deleted:
            self.index.delete(np.fromiter(self._deleted, np.int64, len(self._deleted)))
            self._deleted.clear()
        if not self._dirty:
            return 0
        users = np.fromiter(sorted(self._dirty), np.int64, len(self._dirty))
        self._dirty.clear()
        for start in range(0, len(users), self.batch):
            chunk = users[start : start + self.batch]
            self.index.upsert(chunk, np.asarray(tower.candidate_vectors(chunk, source), np.float32))
        self.recomputed += len(users)
        return len(users)

    def neighbours(self, tower: CandidateTower, user: int, source: object, k: int,
                   exclude: Collection[int]) -> list[tuple[int, float]]:
        """Up to k (user, two-tower score) pairs, best first: the candidates whose candidate-tower vectors have
        the largest inner product with the user's query-tower vector (``exclude`` and the user left out)."""
        if k <= 0 or len(self.index) == 0:
            return []
        query = np.asarray(tower.query_vector(user, source), np.float32)
        return self.index.search(query, k, exclude={user, *exclude})
