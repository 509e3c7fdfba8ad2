"""Per-partition state of a worker and its commit protocol.

Each partition number p that this worker is assigned has one RocksDB database (``state/p{p}``) holding the
feature rows of p's users and, in the same atomic write, the offset of the last message applied from each
input topic-partition. The commit order, in one place (:meth:`WorkerState.flush`), under a lock that keeps
event processing out:

0. embed and rank the users whose state changed and who are still owed a list (:mod:`pymk.streams.refresh`):
   their embeddings and lists join the outputs, their pending-work rows the state;
1. take every partition's outbox (messages for other partitions, degree and profile records) and the
   dead letters;
2. produce them and wait until the broker has them all;
3. write each partition's dirty rows + applied offsets in one RocksDB WriteBatch;
4. ack the events to faust, which commits their offsets to Kafka on its next commit.

With a sharded ANN index the owed lists' answers from the other shards are gathered *before* step 0, with the
lock released (ingest goes on while the peers answer); step 0 then ranks from them, and a list whose user's
vector or exclusions moved meanwhile waits for the next slice (streams/ann_shards.py).

Between two flushes, :meth:`WorkerState.refresh_now` takes the outboxes (step 1) and ranks owed lists in
short slices under the same lock, and sends them at once: a list is out a few milliseconds after it is ranked
instead of at the end of a flush that ranks dozens, and the other user of a connection, in another partition,
hears of it without waiting for the flush. These sends are awaited by the next flush's step 2, so the order
above holds for them too: the state that caused an outbox message, or a pending-work row that says
"refreshed", is written (step 3) only once the broker has the message or the list. A crash before that
re-reads the events, which sends the messages again (applying one twice changes nothing) and re-ranks the user
(the list is keyed by user on a compacted topic: publishing it twice is harmless). A list may reflect events
not yet durable in RocksDB: a crash re-reads them from Kafka and gives the same state.

Why this gives exactly-once *effect* with at-least-once delivery: every state change is an idempotent merge
(last-writer-wins registers), so applying a message twice changes nothing; messages an event caused are
durable in Kafka before the state that records the event as applied (2 before 3), so a crash can lose only
state whose cause will be re-read; and offsets in RocksDB let a worker skip what it already applied and
re-read from there when its local state is older than the group's committed offsets (a partition that comes
back to a worker, or one that moves to a worker without local state: it replays the partition's topics from
the start — the input topics are the changelog).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pymk.events import DeadLetter, Impression, Recommendations, unshown_sample_to_json
from pymk.features.activity import ActivityLeaderboard, PopularEntry
from pymk.features.behaviour import PartitionBehaviour
from pymk.features.graph import DegreeUpdate, EdgeHalf, MirrorUpdate, PartitionGraph, version_ts
from pymk.features.keyspace import EVENT_TIME, OFFSETS  # the rows: features/keyspace.py
from pymk.features.profile import ProfileStore
from pymk.features.storage import CacheBudget, CachedRowHolder, RocksMemory, RocksRowStore, RowHolder
from pymk.streams.codec import Message, degree_record, encode_partition_batches, popular_record, profile_record
from pymk.streams.errors import InternalErrors
from pymk.streams.work import EmbeddingStore, PendingWork, PublishedLists

if TYPE_CHECKING:
    from pymk.index.records import EmbeddingRecord
    from pymk.streams.ann_shards import Gathered
    from pymk.streams.refresh import Refresher

log = logging.getLogger(__name__)

OFFSETS_PREFIX = OFFSETS  # + the input topic's name
EVENT_TIME_KEY = EVENT_TIME  # the partition's event-time watermark: the largest event ts applied to it
RECENT_EVENTS = 10_000  # applied events kept in memory for the debug page, per worker
SLOW_FLUSH_S = 0.25  # a flush (or a slice between flushes) at least this long is logged with what it did
# re-embeddings per embedder call in a slice between flushes: a slice looks at the clock between two calls, so
# this bounds how far past its budget it runs (the event loop waits for it)
EMBED_CHUNK_BETWEEN_FLUSHES = 2


@dataclass
class PartitionState:
    """Everything pymk keeps about the users of one partition, in one RocksDB database."""

    partition: int
    store: RocksRowStore
    graph: PartitionGraph
    behaviour: PartitionBehaviour
    profiles: ProfileStore
    work: PendingWork
    embeddings: EmbeddingStore
    published: PublishedLists
    applied: dict[str, int] = field(default_factory=dict)  # topic → last applied offset (durable at flush)
    pending_applied: dict[str, int] = field(default_factory=dict)
    changed_profiles: set[int] = field(default_factory=set)  # to publish to user-globals at the next flush
    forward: list[tuple[str, bytes, bytes]] = field(default_factory=list)  # misrouted events, re-keyed
    # Lists are ranked as of this event time, not the wall clock, so a replay of history ranks as live traffic
    # did then, and a partition re-processed after a crash ranks as it did before.
    event_time_ms: int = 0
    forced_refresh: set[int] = field(default_factory=set)  # `pymk refresh` commands since the last flush
    forced_reembed: set[int] = field(default_factory=set)
    cache_budget: CacheBudget = field(default_factory=lambda: CacheBudget(max_bytes=1 << 62))
    # reachable globals: the partition's users by weekly activity, and the list last published (popular_record_of)
    popular: ActivityLeaderboard | None = None
    popular_published: tuple[list[PopularEntry], bool] | None = None
    popular_version: int = 0

    @classmethod
    def open(cls, partition: int, partitions: int, path: Path, partition_of: Callable[[int], int],
             max_item_fanout: int | None = None, cache_bytes: int | None = None,
             rocks_memory: RocksMemory | None = None, materialise_common: bool = True,
             hub_degree: int = 0) -> PartitionState:
        store = _open_with_retry(path, rocks_memory)
        applied = {key[len(OFFSETS_PREFIX):].decode(): int(value)
                   for key, value in store.scan(OFFSETS_PREFIX)}
        watermark = store.get(EVENT_TIME_KEY)
        graph = PartitionGraph(partition, partitions, store, partition_of, materialise_common=materialise_common,
                               hub_degree=hub_degree)
        converted = graph.reconcile_common_rows()
        if converted:
            log.info("partition %d: common-neighbour counts converted to PYMK_COMMON_COUNTS=%s (%s)", partition,
                     "materialised" if materialise_common else "on-read", converted)
        return cls(partition, store, graph,
                   PartitionBehaviour(partition, partitions, store, partition_of, max_item_fanout=max_item_fanout),
                   ProfileStore(store), PendingWork(store), EmbeddingStore(store), PublishedLists(store), applied,
                   event_time_ms=int(watermark) if watermark is not None else 0,
                   cache_budget=CacheBudget(max_bytes=cache_bytes if cache_bytes is not None else 1 << 62))

    @property
    def parts(self) -> tuple[RowHolder, ...]:
        """Every holder of rows of this partition."""
        return (self.graph, self.behaviour, self.profiles, self.work, self.embeddings, self.published)

    def dirty_rows(self) -> tuple[dict[bytes, bytes], list[bytes]]:
        puts: dict[bytes, bytes] = {}
        deletes: list[bytes] = []
        for part in self.parts:
            more_puts, more_deletes = part.dirty_rows()
            puts.update(more_puts)
            deletes.extend(more_deletes)
        return puts, deletes

    def mark_clean(self) -> None:
        for part in self.parts:
            part.mark_clean()

    @property
    def cached_parts(self) -> tuple[CachedRowHolder, ...]:
        """The row caches that may be dropped (pending work is the backlog itself: always held)."""
        return (self.graph, self.behaviour, self.profiles, self.embeddings, self.published)

    def cached_bytes(self) -> int:
        return sum(part.cached_bytes() for part in self.cached_parts)

    def cached_rows(self) -> int:
        return sum(part.cached_rows() for part in self.cached_parts)

    def evict_oldest(self, fraction: float) -> None:
        for part in self.cached_parts:
            part.evict_oldest(fraction)

    def bound_memory(self) -> None:
        """After a flush (nothing dirty): evict the oldest cached rows if the caches outgrew this partition's
        budget."""
        self.cache_budget.check(self.cached_bytes, self.evict_oldest, self.cached_rows)

    def knows(self, user: int) -> bool:
        """Whether some event created ``user`` here (connections, a profile, or behaviour), read without caching."""
        return self.graph.has_user(user) or self.profiles.has_user(user) or self.behaviour.has_user(user)

    def next_offset(self, topic: str) -> int:
        return max(self.applied.get(topic, -1), self.pending_applied.get(topic, -1)) + 1


def _open_with_retry(path: Path, memory: RocksMemory | None = None, attempts: int = 50) -> RocksRowStore:
    # During a rebalance the previous owner on this machine may still be closing the database.
    for attempt in range(attempts):
        try:
            return RocksRowStore(path, memory=memory)
        except Exception as exc:  # rocksdict raises a plain Exception for the lock
            if "lock" not in str(exc).lower() or attempt == attempts - 1:
                raise
            time.sleep(0.2)
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class OutputTopics:
    embeddings: str
    recommendations: str
    impressions: str
    impressions_unshown: str


Sender = Callable[[str, bytes | None, bytes, int | None], Awaitable[Any]]
Outgoing = tuple[str, bytes | None, bytes, int | None]  # topic, key, value, partition (None: by key)


def is_record_error(exc: BaseException) -> bool:
    """Whether a send failed because of the record itself (too large, say), so that resending it can never work:
    such a record is dead-lettered and the flush goes on. Any other failure (the broker gone past its timeouts)
    still stops the worker: nothing could be made durable."""
    from aiokafka.errors import InvalidMessageError, MessageSizeTooLargeError, RecordTooLargeError

    return isinstance(exc, MessageSizeTooLargeError | RecordTooLargeError | InvalidMessageError)


@dataclass
class FlushStats:
    flushes: int = 0
    messages_sent: int = 0
    rows_written: int = 0
    seconds: float = 0.0
    messages_between_flushes: int = 0  # outbox messages sent between flushes (WorkerState.refresh_now)


def popular_record_of(state: PartitionState, degree_updates: Sequence[DegreeUpdate], per_partition: int,
                      now_ms: int) -> tuple[bytes, bytes] | None:
    """The partition's most active users as a user-globals record (codec.popular_record), when they differ from
    the last published: its board, built from the partition's users at the first call (a partition just opened
    publishes once), follows the degree updates this flush sends. Versioned by the wall clock (at least one more
    than the last), so a partition's new owner after a rebalance supersedes the old one's list."""
    board = state.popular
    if board is None:
        board = state.popular = ActivityLeaderboard()
        for user in state.graph.local_users():
            held = state.graph.connection_activity(user)
            if held is not None:
                board.update(user, held[0], held[1], state.graph.degree(user))
    for update in degree_updates:
        board.update(update.user, update.activity, update.last_ts, update.degree, update.version)
    entries = board.top_entries(per_partition + 1)
    top = (entries[:per_partition], len(entries) <= per_partition)
    if top == state.popular_published:
        return None
    state.popular_published = top
    state.popular_version = max(now_ms, state.popular_version + 1)
    return popular_record(state.partition, state.popular_version, *top)


class WorkerState:
    """The partitions a worker owns, the events applied since the last flush, and the flush itself."""

    def __init__(self, state_dir: Path, partitions: int, partition_of: Callable[[int], int],
                 messages_topic: str, globals_topic: str, dead_letter_topic: str, send: Sender,
                 max_item_fanout: int | None = None, cache_bytes_per_partition: int | None = None,
                 rocks_memory: RocksMemory | None = None, refresher: Refresher | None = None,
                 materialise_common: bool = True, hub_degree: int = 0,
                 topics: OutputTopics | None = None, backlog_of: Callable[[], int] | None = None,
                 between_flushes_max_backlog: int | None = None,
                 error_listener: Callable[[str], None] | None = None, partition_tops: int = 0) -> None:
        self.state_dir = state_dir
        # reachable globals: each partition's this many most active users go to user-globals (popular_record_of)
        self.partition_tops = partition_tops
        self.partitions = partitions
        self.partition_of = partition_of
        self.messages_topic = messages_topic
        self.globals_topic = globals_topic
        self.dead_letter_topic = dead_letter_topic
        self.dead_letters: list[tuple[bytes | None, bytes]] = []  # (key, record) of invalid events applied
        self.send = send
        self.max_item_fanout = max_item_fanout
        self.cache_bytes_per_partition = cache_bytes_per_partition
        self.rocks_memory = rocks_memory
        self.materialise_common = materialise_common
        self.hub_degree = hub_degree
        self.owned: dict[int, PartitionState] = {}
        self.lock = asyncio.Lock()
        self.unacked: list[tuple[Any, Any]] = []  # (stream, event) applied but not yet durable
        self.in_flight: list[Awaitable[Any]] = []  # sends made between flushes; awaited by the next flush's step 2
        self._in_flight_about: list[tuple[str, bytes | None, int]] = []  # (topic, key, size) of each of them
        self.errors = InternalErrors(error_listener)
        # the last events applied here (user ids, then the event), for the debug page: memory only, bounded
        self.recent_events: deque[tuple[tuple[int, ...], dict[str, Any]]] = deque(maxlen=RECENT_EVENTS)
        self.unsent: list[Outgoing] = []  # outputs of a slice between flushes it could not send (the flush sends)
        self.closing: set[int] = set()  # partitions being closed (revoked): flushed one last time, then closed
        self.stats = FlushStats()
        # embeds and ranks the users touched since the last flush (None: features only, no models), into topics
        self.refresher = refresher
        self.topics = topics
        # messages of the owned partitions not applied yet (the refresh budget yields to them)
        self.backlog_of = backlog_of
        # when refresh_now runs between flushes: while at most this many input messages wait, it embeds and
        # ranks, and flushes do not (past it, the input is falling behind and flushes rank with their own budget
        # and catch-up rule); None: flushes embed and rank
        self.between_flushes_max_backlog = between_flushes_max_backlog

    # ---- partition ownership -------------------------------------------------------------------------
    def open_partitions(self, numbers: Iterable[int]) -> None:
        for p in sorted(set(numbers) - set(self.owned)):
            self.owned[p] = PartitionState.open(p, self.partitions, self.state_dir / f"p{p}", self.partition_of,
                                                self.max_item_fanout, self.cache_bytes_per_partition,
                                                self.rocks_memory, self.materialise_common, self.hub_degree)
            log.info("opened state of partition %d (applied offsets %s)", p, self.owned[p].applied)

    async def close_partitions(self, numbers: Iterable[int]) -> None:
        doomed = set(numbers) & set(self.owned)
        if not doomed:
            return
        self.closing |= doomed  # ranking between flushes leaves them alone between the last flush and the close
        try:
            await self.flush()
            async with self.lock:
                for p in doomed:
                    self.owned.pop(p).store.close()
                    log.info("closed state of partition %d", p)
        finally:
            self.closing -= doomed

    async def close_all(self) -> None:
        await self.close_partitions(list(self.owned))

    # ---- applying ----------------------------------------------------------------------------------------
    def note_event(self, users: tuple[int, ...], kind: str, ts: int, summary: str) -> None:
        """Remember an applied event for the debug page (``events_of``)."""
        self.recent_events.append((users, {"ts": ts, "kind": kind, "summary": summary}))

    def events_of(self, user: int, limit: int = 20) -> list[dict[str, Any]]:
        """The last ``limit`` remembered events that named ``user``, newest first."""
        found = []
        for users, event in reversed(self.recent_events):
            if user in users:
                found.append(event)
                if len(found) == limit:
                    break
        return found

    def state_for(self, partition: int) -> PartitionState | None:
        return self.owned.get(partition)

    def record(self, state: PartitionState, topic: str, offset: int, stream: Any, event: Any) -> None:
        state.pending_applied[topic] = max(offset, state.pending_applied.get(topic, -1))
        if stream is not None:
            self.unacked.append((stream, event))

    def apply_messages(self, state: PartitionState, messages: Iterable[Message]) -> None:
        graph_kinds = (EdgeHalf, MirrorUpdate)
        for message in messages:
            if isinstance(message, EdgeHalf):  # the other half of a connection: its time reaches this partition
                state.event_time_ms = max(state.event_time_ms, version_ts(message.version))
                self.note_event((message.owner, message.other), "connections", version_ts(message.version),
                                f"{message.owner} — {message.other} {'remove' if message.version % 2 else 'add'} "
                                "(the half owned here, from the other user's partition)")
            if isinstance(message, graph_kinds):
                state.graph.apply_message(message)
            else:
                state.behaviour.apply_message(message)

    # ---- the commit protocol -------------------------------------------------------------------------------
    async def flush(self) -> None:
        gathered = await self._gather_for_flush()  # sharded ANN: the peers awaited without the lock
        async with self.lock:
            started = time.perf_counter()
            # what a slice between flushes took but could not send goes first: before a newer list or embedding
            # of the same user, which the compacted topics must keep
            outgoing: list[Outgoing] = self.unsent
            self.unsent = []
            # 0. embeddings and lists of the users whose state changed (they go out with the other outputs)
            if self.refresher is not None:
                backlog = self._input_backlog()
                # While the input keeps up, the slices between flushes embed and rank (refresh_now): the flush only
                # sends and writes, so it blocks the event loop for tens of milliseconds, not for a budget of lists.
                if self._flush_ranks(backlog):
                    try:
                        outgoing.extend(await self._refresh_outputs(idle=not self.unacked, backlog=backlog,
                                                                    gathered=gathered))
                    except BaseException:  # cancelled while gathering ANN shards: what was taken goes next time
                        self.unsent[:0] = outgoing
                        raise
            refreshed_at, refresh_records = time.perf_counter(), len(outgoing)
            # 1. outboxes
            outgoing.extend(self._take_outboxes(self.owned.values()))
            # 2. produce and wait for the broker
            futures, about = await self._send_all(outgoing)
            futures.extend(self.in_flight)
            about.extend(self._in_flight_about)
            self.in_flight, self._in_flight_about = [], []
            await self._wait_sent(futures, about)
            sent_at = time.perf_counter()
            # 3. state and applied offsets, one atomic batch per partition
            rows = 0
            for state in self.owned.values():
                puts, deletes = state.dirty_rows()
                if not puts and not deletes and not state.pending_applied:
                    continue
                for topic, offset in state.pending_applied.items():
                    puts[OFFSETS_PREFIX + topic.encode()] = str(offset).encode()
                puts[EVENT_TIME_KEY] = str(state.event_time_ms).encode()
                state.store.write(puts, deletes)
                state.mark_clean()
                state.applied.update(state.pending_applied)
                state.pending_applied.clear()
                rows += len(puts) + len(deletes)
            for state in self.owned.values():  # also partitions only read from (ranking loads rows too)
                state.bound_memory()
            # 4. ack: faust may now commit these offsets
            unacked, self.unacked = self.unacked, []
            for stream, event in unacked:
                await stream.ack(event)
            self.stats.flushes += 1
            self.stats.messages_sent += len(futures)
            self.stats.rows_written += rows
            seconds = time.perf_counter() - started
            self.stats.seconds += seconds
            if seconds >= SLOW_FLUSH_S:  # the event loop was blocked this long: say what by
                log.info("slow flush: %.0f ms (embeddings and lists %.0f ms for %d records, %d messages sent in "
                         "%.0f ms, %d rows written and acks %.0f ms)", 1000 * seconds, 1000 * (refreshed_at - started),
                         refresh_records, len(futures), 1000 * (sent_at - refreshed_at), rows,
                         1000 * (time.perf_counter() - sent_at))

    async def refresh_now(self, budget_s: float) -> int:
        """Work between flushes (module doc): the outboxes sent, new users embedded, then owed lists ranked for
        about ``budget_s`` (at least one), everything sent now; how many messages and lists.

        Sharded ANN: the shards' answers for the lists about to be ranked are gathered with the lock released
        (ingest and a flush go on while the peers answer) and the lists ranked after it is taken again; a list
        whose user's vector or exclusions moved meanwhile waits for the next slice (streams/ann_shards.py)."""
        if self.refresher is None or self.topics is None:
            return 0
        await self.refresher.fetch_facts()  # reachable globals: what the last slice missed, without the lock
        async with self.lock:
            started, now_ms = time.perf_counter(), int(time.time() * 1000)
            states = [state for p, state in self.owned.items() if p not in self.closing]
            if not states:
                return 0
            # first, so that the other user of a connection (another partition) hears of it as soon as possible
            messages = self._take_outboxes(states)
            lists: list[tuple[Recommendations, list[Impression]]] = []
            out: list[Outgoing] = []
            wanted: list[tuple[int, frozenset[int]]] = []
            for state in states:
                self.refresher.collect(state, now_ms)
            if any(state.work.has_refreshes() for state in states):
                out = self._embedding_outputs(self.refresher.embed_due(states, now_ms, new_only=True))
                wanted = self.refresher.ann_wanted(states, now_ms)
                if not wanted:  # one index on this worker: ranked now
                    lists = self.refresher.refresh_due(states, now_ms, budget_s=budget_s)
                    out.extend(self._list_outputs(lists))
                    out.extend(self._embedding_outputs(self.refresher.embed_alongside_lists(states, now_ms)))
            elif any(state.work.has_embeddings_due(now_ms) for state in states):
                # no list owed: re-embeddings, at least one chunk (lists first: they are what users wait for)
                out = self._embedding_outputs(self.refresher.embed_due(states, now_ms, budget_s=budget_s,
                                                                       chunk=EMBED_CHUNK_BETWEEN_FLUSHES))
            sent = await self._send_between_flushes(messages + out)
        if wanted:
            gathered = await self.refresher.gather_ann(wanted)  # the lock released: the peers' answers awaited
            async with self.lock:
                now_ms = int(time.time() * 1000)
                states = [state for p, state in self.owned.items() if p not in self.closing]
                if states:
                    for state in states:  # what ingest applied meanwhile: owed, and marked in the kept lists
                        self.refresher.collect(state, now_ms)
                    self.refresher.install_ann(gathered)
                    lists = self.refresher.refresh_due(states, now_ms, budget_s=budget_s)
                    out = self._list_outputs(lists)
                    out.extend(self._embedding_outputs(self.refresher.embed_alongside_lists(states, now_ms)))
                    sent += await self._send_between_flushes(out)
        self.refresher.stats.lists_between_flushes += len(lists)
        self.stats.messages_between_flushes += len(messages)
        seconds = time.perf_counter() - started
        if seconds >= SLOW_FLUSH_S:
            log.info("slow slice between flushes: %.0f ms (%d outbox messages, %d lists, %d sent in all)",
                     1000 * seconds, len(messages), len(lists), sent)
        return sent

    async def _send_between_flushes(self, outputs: list[Outgoing]) -> int:
        """Send a slice's outputs now (under the lock); how many were sent."""
        sent = 0
        try:
            for topic, key, value, partition in outputs:
                future = await self._send_one(topic, key, value, partition)
                if future is not None:
                    self.in_flight.append(future)
                    self._in_flight_about.append((topic, key, len(value)))
                sent += 1
        except BaseException:
            # Cancelled (the worker is stopping) or failed between two sends: what was not sent goes with the
            # next flush, first. It was taken out of the outboxes, and its users are marked embedded and
            # refreshed: the flush would otherwise write that down with nothing sent.
            self.unsent.extend(outputs[sent:])
            raise
        return sent

    # ---- sending (steps 2 of the flush and of the slices between flushes) -----------------------------------
    async def _send_one(self, topic: str, key: bytes | None, value: bytes, partition: int | None) -> Any:
        """Hand one record to the producer; None when the record itself cannot be sent (then dead-lettered)."""
        try:
            return await self.send(topic, key, value, partition)
        except Exception as exc:
            if not is_record_error(exc):
                raise
            self._unsendable(exc, topic, key, len(value), partition)
            return None

    async def _send_all(self, outgoing: list[Outgoing]) -> tuple[list[Awaitable[Any]], list[tuple[str, bytes | None,
                                                                                                     int]]]:
        futures: list[Awaitable[Any]] = []
        about: list[tuple[str, bytes | None, int]] = []
        for topic, key, value, partition in outgoing:
            future = await self._send_one(topic, key, value, partition)
            if future is not None:
                futures.append(future)
                about.append((topic, key, len(value)))
        return futures, about

    async def _wait_sent(self, futures: list[Awaitable[Any]], about: list[tuple[str, bytes | None, int]]) -> None:
        """Wait until the broker has every record; one it refuses for itself is dead-lettered (and that dead letter
        waited for too), anything else stops the flush."""
        while futures:
            results = await asyncio.gather(*futures, return_exceptions=True)
            failures = [(result, what) for result, what in zip(results, about, strict=True)
                        if isinstance(result, BaseException)]
            for result, _ in failures:
                if not isinstance(result, Exception) or not is_record_error(result):
                    raise result
            for result, (topic, key, size) in failures:
                self._unsendable(result, topic, key, size, None)
            letters = [(self.dead_letter_topic, key, value, None) for key, value in self.dead_letters]
            self.dead_letters = []
            futures, about = await self._send_all(letters)

    def _unsendable(self, exc: BaseException, topic: str, key: bytes | None, size: int, partition: int | None) -> None:
        if topic == self.dead_letter_topic:  # bounded by construction (DeadLetter): never expected; do not loop
            self.errors.record("publishing", exc, f"a dead letter of {size} bytes (dropped)")
            return
        letter = DeadLetter.for_message(topic, -1 if partition is None else partition, -1,
                                        self.errors.record("publishing", exc, f"a {topic} record of {size} bytes"),
                                        b"", key=key)
        self.dead_letters.append((letter.record_key, letter.to_json()))

    def user_failed(self, stage: str, exc: BaseException, topic: str, partition: int, user: int) -> None:
        """An embedding or a list of one user failed (the Refresher's callback): dead-letter it and go on."""
        letter = self.errors.user_letter(stage, exc, topic, partition, user)
        self.dead_letters.append((letter.record_key, letter.to_json()))

    def _take_outboxes(self, states: Iterable[PartitionState]) -> list[Outgoing]:
        """Step 1: the dead letters, and what the applied events owe other partitions and the table topics, taken
        out of the outboxes."""
        outgoing: list[Outgoing] = [(self.dead_letter_topic, key, value, None) for key, value in self.dead_letters]
        self.dead_letters = []
        for state in states:
            per_partition, degree_updates = state.graph.take_outbox()
            for target, behaviour_messages in state.behaviour.take_outbox().items():
                per_partition.setdefault(target, []).extend(behaviour_messages)  # type: ignore[arg-type]
            for target, messages in per_partition.items():
                outgoing.extend((self.messages_topic, str(target).encode(), raw, target)
                                for raw in encode_partition_batches(state.partition, messages))
            outgoing.extend((self.globals_topic, *degree_record(update), None) for update in degree_updates)
            if self.partition_tops:
                record = popular_record_of(state, degree_updates, self.partition_tops, int(time.time() * 1000))
                if record is not None:
                    outgoing.append((self.globals_topic, *record, None))
            for user in state.changed_profiles:
                profile = state.profiles.profile(user)
                if profile is not None:
                    outgoing.append((self.globals_topic, *profile_record(
                        user, profile.to_dict(), state.profiles.field_timestamps(user)), None))
            state.changed_profiles.clear()
            outgoing.extend((topic, key, value, None) for topic, key, value in state.forward)
            state.forward.clear()
        return outgoing

    def _input_backlog(self) -> int:
        return self.backlog_of() if self.backlog_of is not None else 0

    def _flush_ranks(self, backlog: int) -> bool:
        """Whether a flush embeds and ranks: only while the input is behind (else the slices between flushes do)."""
        return self.between_flushes_max_backlog is None or backlog > self.between_flushes_max_backlog

    async def _gather_for_flush(self) -> Gathered | None:
        """Sharded ANN: the answers the flush's lists will rank from, gathered with the lock released (the owed
        users and their exclusions read under it); None when the flush ranks no list or nothing is to be gathered
        (then :meth:`_refresh_outputs` asks under the lock, which finds nothing in one index on this worker).
        Reachable globals: first, the facts the last lists and embeddings missed, also without the lock."""
        if self.refresher is None or self.topics is None:
            return None
        if not self._flush_ranks(self._input_backlog()):
            return None  # the slices between flushes rank: this flush ranks nothing
        await self.refresher.fetch_facts()  # reachable globals: what the last lists missed, without the lock
        async with self.lock:
            now_ms = int(time.time() * 1000)
            states = list(self.owned.values())
            for state in states:
                self.refresher.collect(state, now_ms)
            wanted = self.refresher.ann_wanted(states, now_ms)
        if not wanted:
            return None
        return await self.refresher.gather_ann(wanted)

    async def _refresh_outputs(self, idle: bool, backlog: int, gathered: Gathered | None = None) -> list[Outgoing]:
        """``idle``: nothing was applied since the last flush (the budgets may grow); ``backlog``: input not
        applied yet (past a limit the budgets shrink, see streams/refresh.py); ``gathered``: the sharded index's
        answers gathered before the lock was taken (:meth:`_gather_for_flush`), else they are gathered here."""
        assert self.refresher is not None and self.topics is not None
        now_ms = int(time.time() * 1000)
        states = list(self.owned.values())
        for state in states:
            self.refresher.collect(state, now_ms)
        catching_up = self.refresher.observe_input_backlog(backlog)
        out = self._embedding_outputs(self.refresher.embed_due(states, now_ms, idle=idle, catching_up=catching_up))
        try:
            if gathered is not None:  # what ingest applied since is collected above: a moved user waits
                self.refresher.install_ann(gathered)
            else:
                await self.refresher.prefetch_ann(states, now_ms)
        except BaseException:
            self.unsent.extend(out)
            raise
        out.extend(self._list_outputs(self.refresher.refresh_due(states, now_ms, idle=idle, catching_up=catching_up)))
        return out

    def _embedding_outputs(self, records: Iterable[EmbeddingRecord]) -> list[Outgoing]:
        assert self.topics is not None
        return [(self.topics.embeddings, record.key, record.encode(), self.partition_of(record.user))
                for record in records]

    def _list_outputs(self, lists: Iterable[tuple[Recommendations, list[Impression]]]
                      ) -> list[Outgoing]:
        """A list, its shown impressions (one record each) and its unshown sample (one record)."""
        assert self.topics is not None
        out: list[Outgoing] = []
        for recommendations, impressions in lists:
            user = recommendations.user
            key, partition = str(user).encode(), self.partition_of(user)
            out.append((self.topics.recommendations, key, recommendations.to_json(), partition))
            shown = [impression for impression in impressions if impression.rank > 0]
            unshown = [impression for impression in impressions if impression.rank == 0]
            out.extend((self.topics.impressions, key, impression.to_json(), partition) for impression in shown)
            if unshown:
                out.append((self.topics.impressions_unshown, key, unshown_sample_to_json(unshown), partition))
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "partitions": sorted(self.owned),
            "applied_offsets": {p: s.applied for p, s in self.owned.items()},
            "event_time_ms": {p: s.event_time_ms for p, s in self.owned.items()},
            "flush": json.loads(json.dumps(self.stats.__dict__)),
            "graph": {p: s.graph.stats.__dict__ for p, s in self.owned.items()},
            "behaviour": {p: s.behaviour.stats.__dict__ for p, s in self.owned.items()},
            "row_cache": {p: {"bytes_at_last_check": s.cache_budget.last_bytes,
                              "bytes_estimated": s.cache_budget.estimated_bytes,
                              "evictions_by_estimate": s.cache_budget.evictions_by_estimate,
                              "budget_bytes": s.cache_budget.max_bytes,
                              "evictions": s.cache_budget.evictions}
                          for p, s in self.owned.items()},
            "rocksdb_memory_bytes": self.rocks_memory.usage_bytes() if self.rocks_memory is not None else None,
        }
