"""Every user's current embedding, without a search graph: what a worker keeps of the users whose HNSW graph
lives on another worker (``PYMK_ANN_MODE=sharded``, streams/global_index.py).

Ranking reads candidates' vectors for the cosine columns whatever shard found them (graph and popular
candidates too), so the vectors stay replicated while the graph is split: 4·dim bytes per user (512 B at dim
128) in one growable float32 array, a byte pair for the user's partition, and ≈ 100 B of dict entry. Pure code.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import repeat

import numpy as np


class VectorStore:
    """user → (vector, partition), with deletion (freed rows are reused)."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._row_of: dict[int, int] = {}
        self._free: list[int] = []
        self._vectors = np.empty((0, dim), dtype=np.float32)
        self._partitions = np.empty(0, dtype=np.int16)
        self._users = np.empty(0, dtype=np.int64)
        self._rows = 0  # rows ever used (the high-water mark)

    def __len__(self) -> int:
        return len(self._row_of)

    def __contains__(self, user: object) -> bool:
        return user in self._row_of

    def put(self, user: int, vector: np.ndarray, partition: int) -> None:
        row = self._row_of.get(user)
        if row is None:
            row = self._free.pop() if self._free else self._grow()
            self._row_of[user] = row
        self._vectors[row] = vector
        self._partitions[row] = partition
        self._users[row] = user

    def delete(self, user: int) -> bool:
        row = self._row_of.pop(user, None)
        if row is None:
            return False
        self._users[row] = -1
        self._free.append(row)
        return True

    def get(self, user: int) -> np.ndarray | None:
        row = self._row_of.get(user)
        return None if row is None else self._vectors[row].copy()

    def get_many(self, users: Sequence[int]) -> np.ndarray:
        """(len(users), dim) float32, a row of NaN for a user without a vector (as AnnIndex.get_many)."""
        rows = np.fromiter(map(self._row_of.get, users, repeat(-1)), np.int64, len(users))
        found = rows >= 0
        if found.all():  # one gather (as AnnIndex.get_many)
            return self._vectors[rows]
        out = np.full((len(users), self.dim), np.nan, dtype=np.float32)
        if found.any():
            out[found] = self._vectors[rows[found]]
        return out

    def partitions_of(self, users: Sequence[int]) -> np.ndarray:
        """Each user's partition (int64), -1 for a user without a vector."""
        rows = np.fromiter(map(self._row_of.get, users, repeat(-1)), np.int64, len(users))
        out = np.full(len(users), -1, np.int64)
        found = rows >= 0
        out[found] = self._partitions[rows[found]]
        return out

    def users(self) -> np.ndarray:
        return np.fromiter(self._row_of, np.int64, len(self._row_of))

    def in_partitions(self, partitions: set[int]) -> tuple[np.ndarray, np.ndarray]:
        """(users, vectors) of the users of these partitions."""
        live = self._users[: self._rows] >= 0
        wanted = live & np.isin(self._partitions[: self._rows], np.fromiter(partitions, np.int16, len(partitions)))
        rows = np.flatnonzero(wanted)
        return self._users[rows].copy(), self._vectors[rows].copy()

    def arrays(self) -> dict[str, np.ndarray]:
        """The live users, their partitions and vectors, for a snapshot (:meth:`from_arrays` reads them)."""
        rows = np.flatnonzero(self._users[: self._rows] >= 0)
        return {"store_users": self._users[rows], "store_partitions": self._partitions[rows],
                "store_vectors": self._vectors[rows]}

    @classmethod
    def from_arrays(cls, dim: int, arrays: dict[str, np.ndarray]) -> VectorStore:
        store = cls(dim)
        users = np.asarray(arrays["store_users"], np.int64)
        n = len(users)
        store._users = users.copy()
        store._partitions = np.asarray(arrays["store_partitions"], np.int16).copy()
        store._vectors = np.asarray(arrays["store_vectors"], np.float32).reshape(n, dim).copy()
        store._rows = n
        store._row_of = dict(zip(users.tolist(), range(n), strict=True))
        return store

    def nbytes(self) -> int:
        return int(self._vectors.nbytes + self._partitions.nbytes + self._users.nbytes)

    def _grow(self) -> int:
        row = self._rows
        if row == len(self._users):
            capacity = max(1024, 2 * row)
            self._vectors = np.concatenate([self._vectors, np.zeros((capacity - row, self.dim), np.float32)])
            self._partitions = np.concatenate([self._partitions, np.zeros(capacity - row, np.int16)])
            self._users = np.concatenate([self._users, np.full(capacity - row, -1, np.int64)])
        self._rows += 1
        return row
