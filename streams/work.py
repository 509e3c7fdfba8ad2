"""Work a partition owes its users after their state changed: (re-)embedding and refreshing their list.

Both are durable rows of the partition's RocksDB database, written in the same batch as the state change
that caused them, so a crash can never lose a refresh whose cause is already committed: the worker that
opens the partition next finds the row and does the work.

- ``Q`` rows: user → (embed due at [wall ms, -1: none], refresh wanted [0/1], first touched since the last
  refresh [wall ms], last touched [wall ms]). The two times order the refresh lanes (streams/refresh.py):
  newest last touch first, and the oldest first touch for the bounded-staleness lane.
- ``G`` rows: user → the latest :class:`EmbeddingRecord` of a local user (the owner's copy; every worker's
  index gets it through the ``embeddings`` topic).
- ``L`` rows: user → the last list published for them.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from itertools import chain

import numpy as np

from pymk.events import Recommendations
from pymk.features.keyspace import EMBEDDING, PENDING, PUBLISHED  # the rows: features/keyspace.py
from pymk.features.storage import ROW_BYTES, RowStore, evict_oldest_rows, row_key, row_user
from pymk.index.records import EmbeddingRecord

_PENDING_ROW = struct.Struct("<qbqq")
_PENDING_ROW_V1 = struct.Struct("<qbq")  # rows written before "last touched" existed: last = first
NO_EMBEDDING_DUE = -1
Row = tuple[int, int, int, int]  # (embed due, refresh wanted, first touched, last touched)


def _unpack_row(value: bytes) -> Row:
    if len(value) == _PENDING_ROW_V1.size:
        due, wanted, first = _PENDING_ROW_V1.unpack(value)
        return due, wanted, first, first
    return _PENDING_ROW.unpack(value)


class PendingWork:
    """The users of one partition with work due, loaded in full at open (one row per user whatever the number of
    changes: the set is at most the partition's users, and under overload it is exactly the backlog)."""

    def __init__(self, store: RowStore) -> None:
        self.store = store
        self.rows: dict[int, Row] = {}
        for key, value in store.scan(PENDING):
            self.rows[row_user(key)] = _unpack_row(value)
        self._dirty: set[int] = set()

    def touch(self, user: int, now_ms: int, embed_due_ms: int | None, refresh: bool) -> None:
        due, wanted, first, last = self.rows.get(user, (NO_EMBEDDING_DUE, 0, now_ms, now_ms))
        if embed_due_ms is not None:
            due = embed_due_ms if due == NO_EMBEDDING_DUE else min(due, embed_due_ms)
        if refresh:
            if not wanted:
                first = now_ms  # the oldest change the next list will answer
            wanted, last = 1, now_ms
        row = (due, wanted, first, last)
        if self.rows.get(user) != row:
            self.rows[user] = row
            self._dirty.add(user)

    def _table(self) -> tuple[np.ndarray, np.ndarray]:
        """(users, rows as an (n, 4) int64 table) in the dict's order, in one pass in C."""
        rows = self.rows
        table = np.fromiter(chain.from_iterable(rows.values()), np.int64, 4 * len(rows)).reshape(-1, 4)
        return np.fromiter(rows.keys(), np.int64, len(rows)), table

    def embeddings_due(self, now_ms: int) -> list[int]:
        """The users whose embedding is due by ``now_ms``, ascending (the rows' table filtered in numpy: a
        generator step per owed user was ~1 % of a busy worker)."""
        if not self.rows:
            return []
        users, table = self._table()
        due = table[:, 0]
        return np.sort(users[(due != NO_EMBEDDING_DUE) & (due <= now_ms)]).tolist()

    def has_embeddings_due(self, now_ms: int) -> bool:
        return any(due != NO_EMBEDDING_DUE and due <= now_ms for due, _, _, _ in self.rows.values())

    def refreshes(self) -> list[tuple[int, int, int]]:
        """(first touched, last touched, user) of every user whose list is owed, oldest first touch first."""
        return sorted((first, last, u) for u, (_, wanted, first, last) in self.rows.items() if wanted)

    def owed_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(first touched, last touched, user) int64 arrays of every user whose list is owed, in no set order:
        what :meth:`refreshes` holds without a Python sort (the lanes are ordered by
        :func:`pymk.streams.refresh.refresh_lanes` with numpy; this runs once per slice between flushes)."""
        users, table = self._table()
        owed = table[:, 1] != 0
        return table[owed, 2], table[owed, 3], users[owed]

    def has_refreshes(self) -> bool:
        return any(wanted for _, wanted, _, _ in self.rows.values())

    def embedded(self, user: int) -> None:
        self._update(user, lambda due, wanted, first, last: (NO_EMBEDDING_DUE, wanted, first, last))

    def refreshed(self, user: int) -> None:
        self._update(user, lambda due, wanted, first, last: (due, 0, first, last))

    def _update(self, user: int, change: Callable[[int, int, int, int], Row]) -> None:
        row = self.rows.get(user)
        if row is None:
            return
        new = change(*row)
        self._dirty.add(user)
        if new[0] == NO_EMBEDDING_DUE and not new[1]:
            del self.rows[user]
        else:
            self.rows[user] = new

    def __len__(self) -> int:
        return len(self.rows)

    def dirty_rows(self) -> tuple[dict[bytes, bytes], list[bytes]]:
        puts: dict[bytes, bytes] = {}
        deletes: list[bytes] = []
        for user in self._dirty:
            row = self.rows.get(user)
            if row is None:
                deletes.append(row_key(PENDING, user))
            else:
                puts[row_key(PENDING, user)] = _PENDING_ROW.pack(*row)
        return puts, deletes

    def mark_clean(self) -> None:
        self._dirty.clear()


class EmbeddingStore:
    """The latest embedding of each local user (a bounded write-back cache over the store)."""

    def __init__(self, store: RowStore, max_cached_rows: int = 200_000) -> None:
        self.store = store
        self.max_cached_rows = max_cached_rows
        self._rows: dict[int, EmbeddingRecord | None] = {}
        self._dirty: set[int] = set()

    def get(self, user: int) -> EmbeddingRecord | None:
        if user not in self._rows:
            raw = self.store.get(row_key(EMBEDDING, user))
            self._rows[user] = EmbeddingRecord.decode(raw) if raw is not None else None
        return self._rows[user]

    def put(self, record: EmbeddingRecord) -> None:
        self._rows[record.user] = record
        self._dirty.add(record.user)

    def put_many(self, records: Iterable[EmbeddingRecord]) -> None:
        for record in records:
            self.put(record)

    def dirty_rows(self) -> tuple[dict[bytes, bytes], list[bytes]]:
        puts = {row_key(EMBEDDING, u): self._rows[u].encode() for u in self._dirty  # type: ignore[union-attr]
                if self._rows.get(u) is not None}
        return puts, []

    def mark_clean(self) -> None:
        self._dirty.clear()
        if len(self._rows) > self.max_cached_rows:
            self._rows.clear()

    def cached_rows(self) -> int:
        return len(self._rows)

    def cached_bytes(self) -> int:
        return sum(ROW_BYTES + (r.vector.nbytes if r is not None else 0) for r in self._rows.values())

    def evict_oldest(self, fraction: float) -> None:
        assert not self._dirty, "evicting dirty rows would lose them"
        evict_oldest_rows(self._rows, fraction)

    def local_users(self) -> Iterable[int]:
        seen = {u for u, r in self._rows.items() if r is not None}
        yield from seen
        for key, _ in self.store.scan(EMBEDDING):
            if row_user(key) not in seen:
                yield row_user(key)


class PublishedLists:
    """The last list published for each local user (for ``GET /recommendations/{u}`` and ``/users/{u}``)."""

    def __init__(self, store: RowStore, max_cached_rows: int = 50_000) -> None:
        self.store = store
        self.max_cached_rows = max_cached_rows
        self._rows: dict[int, bytes] = {}
        self._dirty: set[int] = set()

    def put(self, recommendations: Recommendations) -> None:
        self._rows[recommendations.user] = recommendations.to_json()
        self._dirty.add(recommendations.user)

    def get(self, user: int) -> Recommendations | None:
        raw = self._rows.get(user)
        if raw is None:
            raw = self.store.get(row_key(PUBLISHED, user))
        return Recommendations.from_json(raw) if raw is not None else None

    def dirty_rows(self) -> tuple[dict[bytes, bytes], list[bytes]]:
        return {row_key(PUBLISHED, u): self._rows[u] for u in self._dirty}, []

    def mark_clean(self) -> None:
        self._dirty.clear()
        if len(self._rows) > self.max_cached_rows:
            self._rows.clear()

    def cached_rows(self) -> int:
        return len(self._rows)

    def cached_bytes(self) -> int:
        return sum(ROW_BYTES + len(raw) for raw in self._rows.values())

    def evict_oldest(self, fraction: float) -> None:
        assert not self._dirty, "evicting dirty rows would lose them"
        evict_oldest_rows(self._rows, fraction)
