"""Every worker's ANN index over every user's embedding, fed by the compacted ``embeddings`` topic.

How the index is split when several workers run: it is not. Each worker embeds the users of its own partitions
(their state is local) and publishes each embedding to the compacted ``embeddings`` topic; every worker reads
that topic in full (no consumer group, like the degrees of ``user-globals``) into one FAISS HNSW index of all
users. A query is answered locally with one search, so the neighbours a user gets do not depend on how many
workers run or which one owns whom — 2 workers give the results of 1. The cost is memory (every worker holds
the whole index: 128 floats per user, a quarter of that with int8 quantisation) and one topic read per worker;
past the memory of one machine the next step is sharding by user with a fan-out query, which the topic also
supports (each shard would keep only its users).

The owner also upserts an embedding into its own index at once, in the flush that computed it, so a new user is
searchable on its worker before the topic round trip.

Persistence: a snapshot (index + the topic offsets it includes) is written on a schedule and at shutdown; a
start loads it and reads the topic from those offsets, so every embedding published before a crash is back.
Records are applied by version (the newest wins), which makes re-reading a record harmless.

Sharded (``PYMK_ANN_MODE=sharded``): the HNSW graph holds only the users of the partitions assigned to this
worker. The embeddings topic is keyed by user and partitioned like the inputs (the owner produces a user's
record to ``partition_for_user``), so a record's topic partition is its user's partition. The whole topic is
still read: every vector goes to a :class:`VectorStore` (the cosine columns read any candidate's vector), and
only the assigned partitions' users also go into the graph. :meth:`assign` follows rebalances from the store
(itself read from the compacted topic, so no re-read is needed): a revoked partition's users are dropped at once,
a newly assigned one's added in chunks between which the event loop runs (``ASSIGN_CHUNK``: HNSW insertions of a
large partition take minutes), and the partitions a shard search answers for (``graph_partitions``) are the
ones whose users are all in. The snapshot holds the graph and the store (its ``arrays``) with the offsets of
every partition, so a start resumes the topic where the snapshot was taken in either mode. Stage 1 then searches
every worker's shard (streams/ann_shards.py).

Sharded with reachable globals (``PYMK_GLOBALS_MODE=reachable``, streams/remote_facts.py), the vectors are not
replicated either: the store keeps the vectors of this worker's partitions' users and of the remote users its
``user-globals`` hold (the users its lists and embeddings read), and drops every other record as it is read, so a
worker's vectors grow with its share of the network and its users' reach, not with the network. A remote user's
vector comes with its facts from its owner (the ``/facts`` answer carries the owner's embedding record), then
from the topic; a read of a remote user not held counts a miss on ``user-globals`` (the list waits and the user
is asked, as for its degree). What a rebalance brings in is read again: a newly assigned partition whose records
were dropped here (``complete``: the partitions every record of which was kept) is read from the topic's start
(``rewinds``), and joins ``graph_partitions`` once read up to the end it had when asked; until then its owner
here answers neither its shard searches nor its users' vectors to peers. (Not with ``PYMK_ANN_SPACE=two-tower``,
whose own index of every user is derived from the store: the store then keeps every vector.)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pymk.index.ann import AnnIndex, ann_config
from pymk.index.records import EmbeddingRecord
from pymk.index.vector_store import VectorStore
from pymk.settings import Settings
from pymk.streams.globals import table_consumer
from pymk.streams.partitioning import partition_for_user

log = logging.getLogger(__name__)

ASSIGN_CHUNK = 256  # users added to the graph per step of a rebalance's fill (~50–100 ms of HNSW insertions)


class GlobalIndex:
    def __init__(self, settings: Settings, snapshot_dir: Path) -> None:
        self.settings = settings
        self.topic = settings.topic("embeddings")
        self.snapshot_dir = snapshot_dir
        self.index, watermark, arrays = AnnIndex.load_with_arrays(snapshot_dir, ann_config(settings))
        self.sharded = settings.ann_mode == "sharded"
        # sharded: every user's vector (the graph holds the shard's); None when replicated (the graph holds all)
        self.store: VectorStore | None = None
        # sharded: the partitions whose users the graph holds; None until the first assignment (then the graph
        # is the snapshot's, and only users already in it are updated in it)
        self.shard_partitions: set[int] | None = None
        # sharded: the partitions whose users are all in the graph (what a shard search answers for): the assigned
        # ones once a rebalance's fill is done
        self.graph_partitions: set[int] = set()
        self._filling: asyncio.Task[None] | None = None
        # sharded with reachable globals: only the shard's users' and the held remote users' vectors are kept
        # (not with the two-tower ANN space: its own index of every user is derived from this store's vectors)
        self.reachable = self.sharded and settings.globals_mode == "reachable" and settings.ann_space == "sage"
        # set by the worker (reachable): whether user-globals hold a remote user (its records are kept), and the
        # miss of a read of a remote user's vector that is not here (user-globals count it and ask for the user)
        self.holds: Callable[[int], bool] = lambda user: False
        self.on_miss: Callable[[int], object] = lambda user: None
        # reachable: the partitions every record of which was kept (all of them until the first assignment: a
        # worker keeps everything it reads until it knows its partitions); a newly assigned partition not in it is
        # read again from the topic's start (``_rewind``, then ``_rewinding``: partition → the end offset to reach)
        self.complete: set[int] = set(range(settings.partitions))
        self._rewind: set[int] = set()
        self._rewinding: dict[int, int] = {}
        self.rewinds = 0
        self.records_dropped = 0  # reachable: records of users not kept, dropped as read
        self._load_store(arrays)
        if self.reachable and "complete" in watermark:
            self.complete = {int(p) for p in watermark["complete"]}
        # rebuilds run on a thread (maybe_rebuild): on the event loop one stopped the worker for 0.3 s at 2,500
        # users, and would for minutes at millions
        self.index.rebuild_in_background = True
        self._rebuilding: asyncio.Task[None] | None = None
        self.versions: dict[int, int] = {int(u): int(v) for u, v in watermark.get("versions", {}).items()}
        self.model_versions: dict[int, str] = {}
        self.times: dict[int, int] = {int(u): int(t) for u, t in watermark.get("times", {}).items()}
        self.offsets: dict[int, int] = {int(p): int(o) for p, o in watermark.get("offsets", {}).items()}
        if not self.reachable and "complete" in watermark:
            # a snapshot of a worker that kept only what it reached, opened by one that keeps every vector: the
            # partitions it did not keep whole are read from the start
            for partition in set(range(settings.partitions)) - {int(p) for p in watermark["complete"]}:
                self.offsets.pop(partition, None)
        self.records_applied = 0
        # called with (users, deleted) after their vectors changed: derived indexes (the two-tower space) follow
        self.listeners: list[Callable[[list[int], bool], None]] = []
        self.last_snapshot = time.monotonic()
        self.caught_up = asyncio.Event()
        if self.versions:
            log.info("index snapshot loaded: %d users, offsets %s", len(self.index), self.offsets)

    def _load_store(self, arrays: dict[str, np.ndarray]) -> None:
        """The vector store from a snapshot's arrays, in either direction of a mode change: a replicated
        snapshot's graph holds every vector (the store is made from it); a sharded one's graph holds a shard (a
        replicated start adds the store's other users to it)."""
        dim = self.index.config.dim
        if self.sharded:
            if arrays:
                self.store = VectorStore.from_arrays(dim, arrays)
            else:
                self.store = VectorStore(dim)
                users = self.index.users()
                for user, vector in zip(users.tolist(), self.index.get_many(users.tolist()), strict=True):
                    self.store.put(user, vector, self.partition_of(user))
        elif arrays:
            held = VectorStore.from_arrays(dim, arrays)
            missing = np.array([u for u in held.users().tolist() if u not in self.index], dtype=np.int64)
            if len(missing):
                self.index.upsert(missing, held.get_many(missing.tolist()))

    def partition_of(self, user: int) -> int:
        return partition_for_user(user, self.settings.partitions)

    def _keeps(self, user: int, partition: int | None) -> bool:
        """Whether the user's vector is kept here: always, but with reachable vectors after the first assignment
        only the shard's users' and the users ``user-globals`` hold."""
        if not self.reachable or self.shard_partitions is None:
            return True
        return (self.partition_of(user) if partition is None else partition) in self.shard_partitions or \
            self.holds(user)

    def _in_shard(self, user: int, partition: int | None) -> bool:
        """Whether the user's vector belongs in this worker's graph."""
        if not self.sharded:
            return True
        if self.shard_partitions is None:
            return user in self.index
        return (self.partition_of(user) if partition is None else partition) in self.shard_partitions

    # ---- applying -------------------------------------------------------------------------------------------
    def apply(self, record: EmbeddingRecord, partition: int | None = None) -> bool:
        """Apply one record if it is not older than what the index holds; return whether it changed anything.
        ``partition``: the user's (the record's topic partition), computed when not given."""
        current = self.versions.get(record.user)
        if current is not None and record.version < current:
            return False
        if not self._keeps(record.user, partition):
            self.records_dropped += 1
            return False
        in_shard = self._in_shard(record.user, partition)
        if record.vector.size == 0:
            if self.store is not None:
                self.store.delete(record.user)
            self.index.delete(np.array([record.user], dtype=np.int64))
        else:
            if current == record.version:
                held = self.vector(record.user)
                if held is not None and np.array_equal(held, record.vector):
                    return False
            if self.store is not None:
                self.store.put(record.user, record.vector,
                               self.partition_of(record.user) if partition is None else partition)
            if in_shard:
                self.index.upsert(np.array([record.user], dtype=np.int64), record.vector.reshape(1, -1))
            else:  # a user whose partition moved away since its last vector: not in this graph any more
                self.index.delete(np.array([record.user], dtype=np.int64))
        self.versions[record.user] = record.version
        self.times[record.user] = record.ts
        self.model_versions[record.user] = record.model_version
        self.records_applied += 1
        for listener in self.listeners:
            listener([record.user], record.vector.size == 0)
        return True

    def apply_many(self, records: list[EmbeddingRecord]) -> None:
        """The owner's batch of new embeddings, upserted in one call (faster than one by one)."""
        fresh = [r for r in records if r.vector.size and r.version >= self.versions.get(r.user, -1)
                 and self._keeps(r.user, None)]
        if fresh:
            latest = {r.user: r for r in fresh}  # one per user: the last
            if self.store is not None:
                for record in latest.values():
                    self.store.put(record.user, record.vector, self.partition_of(record.user))
            users = np.fromiter((u for u in latest if self._in_shard(u, None)), dtype=np.int64)
            if len(users):
                self.index.upsert(users, np.stack([latest[int(u)].vector for u in users]))
            for record in latest.values():
                self.versions[record.user] = record.version
                self.times[record.user] = record.ts
                self.model_versions[record.user] = record.model_version
            for listener in self.listeners:
                listener(list(latest), False)
        for record in records:
            if not record.vector.size:
                self.apply(record)

    def assign(self, partitions: set[int]) -> None:
        """Sharded: the graph follows this worker's partitions (a rebalance): the users of newly assigned
        partitions are added from the store, the others dropped. Replicated: nothing to do."""
        if self.store is None:
            return
        partitions = set(partitions)
        if partitions == self.shard_partitions:
            return
        if self._filling is not None:  # a previous assignment's fill: this one's replaces it
            self._filling.cancel()
            self._filling = None
        self.shard_partitions = partitions
        if self.reachable:
            self._reassign_store(partitions)
        held = self.index.users()
        held_partitions = self.store.partitions_of(held.tolist())
        gone = held[~np.isin(held_partitions, np.fromiter(partitions, np.int64, len(partitions)))]
        if len(gone):
            self.index.delete(gone)
        self.graph_partitions &= partitions
        users, _ = self.store.in_partitions(partitions)
        new = users[~np.isin(users, held)]
        log.info("index shard: partitions %s, %d users to add, %d dropped", sorted(partitions), len(new), len(gone))
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not in a worker (tests, tools): at once
            loop = None
        if loop is None or len(new) <= ASSIGN_CHUNK:
            self._add_to_shard(new)
            self.graph_partitions = partitions & self.complete
        else:
            self._filling = loop.create_task(self._fill(new, partitions))

    def _reassign_store(self, partitions: set[int]) -> None:
        """Reachable vectors, at an assignment: the users of partitions no longer this worker's leave the store
        unless user-globals hold them; an assigned partition whose records were dropped here is read again."""
        assert self.store is not None
        users = self.store.users()
        gone = [u for u, p in zip(users.tolist(), self.store.partitions_of(users.tolist()).tolist(), strict=True)
                if p not in partitions and not self.holds(u)]
        self.forget(gone)
        self.complete &= partitions  # records of the others are dropped from now on
        self._rewind |= partitions - self.complete - set(self._rewinding)
        log.info("index store: %d users dropped, partitions %s to read again", len(gone), sorted(self._rewind))

    def forget(self, users: Sequence[int]) -> None:
        """Reachable vectors: drop these users' vectors unless their partition is this worker's (user-globals no
        longer hold them: their next read is a miss, and a fetch)."""
        if not self.reachable or self.store is None:
            return
        dropped = []
        for user in users:
            if self.shard_partitions is not None and self.partition_of(user) in self.shard_partitions:
                continue
            if self.store.delete(user):
                dropped.append(user)
            self.versions.pop(user, None)
            self.times.pop(user, None)
            self.model_versions.pop(user, None)
        if dropped:
            for listener in self.listeners:
                listener(dropped, True)

    def _add_to_shard(self, users: np.ndarray) -> None:
        """Add these users' current vectors (from the store) when their partition is still assigned and the graph
        does not have them yet (a record since may have put a newer one there, or deleted them)."""
        assert self.store is not None and self.shard_partitions is not None
        users = np.array([u for u in users.tolist() if u not in self.index], dtype=np.int64)
        if not len(users):
            return
        partitions = self.store.partitions_of(users.tolist())
        users = users[np.isin(partitions, np.fromiter(self.shard_partitions, np.int64, len(self.shard_partitions)))]
        if len(users):
            self.index.upsert(users, self.store.get_many(users.tolist()))

    async def _fill(self, users: np.ndarray, partitions: set[int]) -> None:
        started = time.perf_counter()
        for start in range(0, len(users), ASSIGN_CHUNK):
            self._add_to_shard(users[start:start + ASSIGN_CHUNK])
            await asyncio.sleep(0)
        self.graph_partitions = partitions & self.complete
        self._filling = None
        log.info("index shard: %d users added in %.2f s", len(users), time.perf_counter() - started)

    def maybe_rebuild(self) -> None:
        """Start a rebuild on a thread if the index's tombstones call for one and none is under way."""
        if self._rebuilding is None and self.index.rebuild_due():
            self._rebuilding = asyncio.get_running_loop().create_task(self._rebuild())

    async def _rebuild(self) -> None:
        started = time.perf_counter()
        index = self.index
        pending = index.begin_rebuild()
        try:
            graph = await asyncio.get_running_loop().run_in_executor(None, AnnIndex.build_graph, pending)
        except Exception:  # the current graph stays, tombstones and all; the next look tries again
            log.exception("index rebuild failed")
            index.abandon_rebuild()
            return
        except BaseException:
            index.abandon_rebuild()
            raise
        finally:
            self._rebuilding = None
        index.finish_rebuild(pending, graph)
        log.info("index rebuilt on a thread: %d users in %.2f s", len(pending.users), time.perf_counter() - started)

    # ---- reads ----------------------------------------------------------------------------------------------
    def __contains__(self, user: int) -> bool:
        """Whether the user has a vector (in any shard)."""
        return user in (self.index if self.store is None else self.store)

    def users(self) -> list[int]:
        """Every user with a vector (in any shard)."""
        return [user for user in self.versions if user in self]

    def vector(self, user: int) -> np.ndarray | None:
        if self.store is None:
            return self.index.get(user)
        vector = self.store.get(user)
        if vector is None and self.reachable:
            self._note_missing([user])
        return vector

    def vectors(self, users: Sequence[int]) -> np.ndarray:
        """(len(users), dim); a row of NaN for a user without an embedding (reachable: or not held here, which
        counts a miss)."""
        if self.store is None:
            return self.index.get_many(users)
        out = self.store.get_many(users)
        if self.reachable and len(out):
            absent = np.flatnonzero(np.isnan(out[:, 0]))
            if len(absent):
                self._note_missing([users[i] for i in absent.tolist()])
        return out

    def _note_missing(self, users: Sequence[int]) -> None:
        """Reachable vectors: a remote user without a vector here may have one at its owner: a miss (a user of a
        partition this worker holds whole has none)."""
        whole = set() if self.shard_partitions is None else self.shard_partitions & self.complete
        for user in users:
            if self.partition_of(user) not in whole:
                self.on_miss(user)

    def answerable(self, user: int) -> bool:
        """Whether this worker can tell a peer the user's vector (reachable: its partition is held whole)."""
        return not self.reachable or self.partition_of(user) in self.complete

    def record(self, user: int) -> EmbeddingRecord | None:
        """The user's current embedding record as held (None: no vector)."""
        vector = self.vector(user) if self.store is None else self.store.get(user)
        version = self.versions.get(user)
        if vector is None or version is None:
            return None
        return EmbeddingRecord(user, version, self.times.get(user, 0), self.model_versions.get(user, ""), vector)

    def describe(self, user: int) -> dict[str, Any] | None:
        version = self.versions.get(user)
        if version is None or user not in self:
            return None
        return {"version": version, "computed_at": self.times.get(user),
                "model_version": self.model_versions.get(user)}

    def neighbours(self, user: int, k: int, exclude: set[int] | None = None) -> list[tuple[int, float]]:
        """The user's top k in this worker's graph: every user's when replicated, this shard's when sharded."""
        vector = self.vector(user)
        if vector is None:
            return []
        return self.index.search(vector, k, exclude={user} | (exclude or set()))

    # ---- persistence ------------------------------------------------------------------------------------------
    def snapshot(self) -> None:
        started = time.perf_counter()
        self.index.snapshot(self.snapshot_dir, {
            "offsets": {str(p): o for p, o in self.offsets.items()},
            "versions": {str(u): v for u, v in self.versions.items()},
            "times": {str(u): t for u, t in self.times.items()},
            **({"complete": sorted(self.complete)} if self.reachable else {}),
        }, arrays=self.store.arrays() if self.store is not None else None)
        self.last_snapshot = time.monotonic()
        log.info("index snapshot: %d users in %.2f s", len(self.index), time.perf_counter() - started)

    async def run(self) -> None:
        """Read the topic from the snapshot's offsets (the beginning without one), then follow it."""
        consumer, tps = await table_consumer(self.settings, self.topic)
        try:
            for tp in tps:
                if tp.partition in self.offsets:
                    consumer.seek(tp, self.offsets[tp.partition])
                else:
                    await consumer.seek_to_beginning(tp)
            ends = await consumer.end_offsets(tps)
            while True:
                if self._rewind:
                    await self._start_rewind(consumer, [tp for tp in tps if tp.partition in self._rewind])
                batches = await consumer.getmany(timeout_ms=500, max_records=10_000)
                for tp, records in batches.items():
                    for record in records:
                        if record.value is not None:
                            self.apply(EmbeddingRecord.decode(record.value), tp.partition)
                        self.offsets[tp.partition] = record.offset + 1
                if self._rewinding:
                    await self._end_rewinds(consumer, tps)
                if not self.caught_up.is_set() and all(self.offsets.get(tp.partition, 0) >= end
                                                       for tp, end in ends.items()):
                    self.caught_up.set()
                self.maybe_rebuild()  # also after the owner's own upserts (flushes, slices): looked at every 0.5 s
                if time.monotonic() - self.last_snapshot >= self.settings.index_snapshot_interval_s:
                    self.snapshot()  # on the loop: the flush upserts into the same index
        finally:
            await consumer.stop()

    async def _start_rewind(self, consumer: Any, tps: list[Any]) -> None:
        """Read these partitions again from their start (reachable vectors: a newly assigned partition)."""
        self._rewind -= {tp.partition for tp in tps}
        ends = await consumer.end_offsets(tps)
        await consumer.seek_to_beginning(*tps)
        for tp in tps:
            self._rewinding[tp.partition] = ends[tp]
            self.rewinds += 1
        log.info("index store: reading partitions %s again up to %s", sorted(tp.partition for tp in tps),
                 {tp.partition: ends[tp] for tp in tps})

    async def _end_rewinds(self, consumer: Any, tps: list[Any]) -> None:
        """A partition read again up to its end (the consumer's position: past any control record) is whole."""
        for tp in tps:
            end = self._rewinding.get(tp.partition)
            if end is None or await consumer.position(tp) < end:
                continue
            del self._rewinding[tp.partition]
            if self.shard_partitions is not None and tp.partition in self.shard_partitions:
                self.complete.add(tp.partition)
                if self._filling is None:
                    self.graph_partitions.add(tp.partition)
            log.info("index store: partition %d read again", tp.partition)
