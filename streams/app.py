"""The faust-streaming application of a pymk worker.

Thin glue: agents take raw messages of the five input topics, validate them (:mod:`pymk.validation`),
dead-letter what cannot be applied, and hand events to the pure feature code through :class:`WorkerState`,
which owns one RocksDB database per assigned partition. Cross-partition updates travel over the internal
``partition-messages`` topic (co-partitioned with the inputs, so its partition p is processed by the owner of
p); every worker reads the compacted ``user-globals`` topic in full for the degrees of remote users.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from functools import lru_cache
from typing import Any

import aiohttp
import faust
from faust.types import TP
from pymk.features.pair import FeatureValue, graph_pair_features
from pymk.features.profile import profile_feature_timestamps, profile_features
from pymk.features.storage import RocksMemory
from pymk.streams.codec import decode_partition_batch
from pymk.streams.gc_pauses import GcPauses
from pymk.streams.global_index import GlobalIndex
from pymk.streams.globals import UserGlobals
from pymk.streams.ingest import InputRules, apply_event, ingest_message, message_failed
from pymk.streams.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from pymk.streams.metrics import WorkerMetrics
from pymk.streams.models import Models
from pymk.streams.partitioning import partition_for_user
from pymk.streams.refresh import Refresher
from pymk.streams.state import OutputTopics, PartitionState, WorkerState
from pymk.streams.user_facts import UserFacts
from yarl import URL

from pymk.events import MAX_USER_ID, UNSHOWN_KIND, InputEvent
from pymk.process_memory import malloc_bytes, pymalloc_bytes, rss_bytes
from pymk.settings import INPUT_KINDS, Settings
from pymk.validation import Invalid

log = logging.getLogger(__name__)

# The 400 answer to a user id outside the contract's: non-negative 64-bit integers.
BAD_USER_ID = "user ids must be non-negative 64-bit integers: ASCII decimal digits, at most 9223372036854775807"
# Debug queries about a user are forwarded to the worker owning the user's partition, marked with this header.
FORWARDED_HEADER = "X-Pymk-Forwarded"
ROUTE_TIMEOUT_S = 10.0
ROUTE_RETRY_AFTER_S = 1


def faust_credentials(settings: Settings) -> Any:
    """faust's credentials object for the security settings (None for PLAINTEXT)."""
    protocol = settings.security_protocol
    context = settings.ssl_context()
    if protocol.startswith("SASL"):
        return faust.SASLCredentials(username=settings.sasl_username, password=settings.sasl_password,
                                     mechanism=settings.sasl_mechanism or "PLAIN", ssl_context=context)
    if protocol == "SSL":
        return faust.SSLCredentials(context)
    if protocol != "PLAINTEXT":
        raise ValueError(f"unsupported security protocol {settings.security_protocol!r}")
    return None


class PymkApp:
    """Builds and holds the faust app, its topics, the worker's state and its metrics."""

    STALL_S = 3.0  # a partition behind that long without progress, all it knows of read, is re-read
    BETWEEN_FLUSHES_IDLE_S = 0.02  # ranking between flushes looks again this often when it found nothing to do
    INPUT_FIRST_S = 0.05  # before a slice between flushes, the input waiting gets up to this long to be applied

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = WorkerMetrics()
        self.gc_pauses = GcPauses(unfreeze_interval_s=settings.gc_unfreeze_interval_s or None)
        self.gc_pauses.install()
        worker_home = (settings.worker_dir / settings.app_id).resolve()
        self.app = faust.App(
            settings.app_id,
            broker=f"kafka://{settings.bootstrap.replace(',', ';kafka://')}",
            broker_credentials=faust_credentials(settings),
            store="rocksdb://",
            # faust's own files are per worker process; pymk's partition state is per machine (see state.py)
            datadir=str(worker_home / f"faust-{socket.gethostname()}-{settings.web_port}"),
            topic_partitions=settings.partitions,
            topic_replication_factor=settings.replication_factor,
            consumer_auto_offset_reset="earliest",
            web_enabled=True,
            web_bind=settings.web_host,
            web_host=settings.web_host,
            web_port=settings.web_port,
            producer_max_request_size=4 * 1024 * 1024,
            broker_max_poll_records=2000,
            broker_commit_interval=1.0,
            broker_session_timeout=settings.session_timeout_s,
            broker_heartbeat_interval=min(3.0, settings.session_timeout_s / 3),
            autodiscover=False,
        )
        partitions = settings.partitions
        self.partition_of = lru_cache(maxsize=1_000_000)(lambda user: partition_for_user(user, partitions))
        raw = {"key_serializer": "raw", "value_serializer": "raw", "partitions": partitions}
        self.input_topics = {kind: self.app.topic(settings.topic(kind), **raw) for kind in INPUT_KINDS}
        self.dead_letter_topic = self.app.topic(settings.topic("dead-letter"), **raw)
        self.messages_topic = self.app.topic(settings.topic("partition-messages"), **raw)
        self.commands_topic = self.app.topic(settings.topic("commands"), **raw)
        self.globals = UserGlobals(settings)
        self.index = GlobalIndex(settings, worker_home / f"index-{socket.gethostname()}-{settings.web_port}")
        self.models = Models(settings) if settings.recommend else None
        self.state = WorkerState(worker_home / "state", partitions, self.partition_of,
                                 settings.topic("partition-messages"), settings.topic("user-globals"),
                                 settings.topic("dead-letter"), self._send,
                                 max_item_fanout=settings.max_item_fanout or None,
                                 cache_bytes_per_partition=settings.state_cache_mb * 2**20 // partitions,
                                 rocks_memory=RocksMemory(settings.rocksdb_memory_mb * 2**20))
        self.refresher = (Refresher(settings, self.index, self.models, self.degree_value, self.profile_value,
                                    self.globals.activity, self.globals.most_active,
                                    facts=UserFacts(self.facts_value))
                          if self.models is not None else None)
        if self.refresher is not None and self.refresher.facts is not None:
            facts = self.refresher.facts
            self.globals.listeners.append(lambda user: facts.invalidate((user,)))
        self.state.refresher = self.refresher
        if self.refresher is not None:
            self.refresher.on_user_error = self._user_failed
            self.refresher.delays = self.metrics.list_refresh_seconds
        self.state.errors.listener = self.metrics.internal_error
        self.state.backlog_of = self.input_backlog
        self.state.topics = OutputTopics(embeddings=settings.topic("embeddings"),
                                         recommendations=settings.topic("recommendations"),
                                         impressions=settings.topic("impressions"),
                                         impressions_unshown=settings.topic(UNSHOWN_KIND))
        self._seeking: set[Any] = set()
        self._stalled: dict[Any, tuple[int, float]] = {}  # tp → (state's next offset, since when) (_reseek_timer)
        for kind, topic in self.input_topics.items():
            self.app.agent(topic, name=f"pymk.ingest.{kind}")(self._make_ingest_agent(kind))
        self.app.agent(self.messages_topic, name="pymk.partition-messages")(self._messages_agent)
        self.app.agent(self.commands_topic, name="pymk.commands")(self._commands_agent)
        self.app.timer(settings.flush_interval_ms / 1000.0)(self._flush_timer)
        self.app.timer(1.0)(self._reseek_timer)
        self.app.timer(1.0)(self._gc_timer)
        if self.refresher is not None and settings.refresh_between_flushes_ms > 0:
            self.app.task(self._rank_between_flushes)
            self.state.between_flushes_max_backlog = settings.refresh_keeping_up_backlog
        if self.models is not None:
            self.app.timer(settings.model_reload_interval_s)(self._reload_timer)
        self.app.task(self.globals.run)
        self.app.task(self.index.run)
        self.app.on_partitions_assigned.connect(self._on_assigned)
        self.app.on_partitions_revoked.connect(self._on_revoked)
        self.app.on_before_shutdown.connect(self._on_shutdown)
        self._register_views()

    # ---- producing (used by the flush) --------------------------------------------------------------------
    async def _send(self, topic: str, key: bytes | None, value: bytes, partition: int | None) -> Any:
        return await self.app.producer.send(topic, key, value, partition, None, None)

    # ---- partition ownership ------------------------------------------------------------------------------
    def _our_partitions(self, tps: set[Any]) -> set[int]:
        ours = {t.get_topic_name() for t in (*self.input_topics.values(), self.messages_topic, self.commands_topic)}
        return {tp.partition for tp in tps if tp.topic in ours}

    async def _on_assigned(self, sender: Any, assigned: set[Any], **kwargs: Any) -> None:
        self.state.open_partitions(self._our_partitions(assigned))

    async def _on_revoked(self, sender: Any, revoked: set[Any], **kwargs: Any) -> None:
        await self.state.close_partitions(self._our_partitions(revoked))

    async def _on_shutdown(self, sender: Any, **kwargs: Any) -> None:
        # The consumer has stopped, the producer still runs: make the last events' effects durable.
        try:
            await self.flush()
            await self.state.close_all()
        except Exception:
            log.exception("final flush failed; the unflushed events will be re-read at the next start")
        try:
            self.index.snapshot()
        except Exception:
            log.exception("index snapshot at shutdown failed; the next start replays the embeddings topic")

    # ---- agents ---------------------------------------------------------------------------------------------
    async def _admit(self, stream: Any, event: Any) -> PartitionState | None:
        """The partition state for a message, or None when it must be skipped (already applied, not ours,
        or ahead of what this worker's state has applied: then re-read from there)."""
        message = event.message
        state = self.state.state_for(message.partition)
        if state is None:
            await stream.ack(event)
            return None
        expected = state.next_offset(message.topic)
        if message.offset < expected:
            await stream.ack(event)
            return None
        if message.offset > expected:
            if message.tp not in self._seeking:
                log.warning("%s: local state has applied up to offset %d, the group is at %d: re-reading",
                            message.tp, expected - 1, message.offset)
                self._seeking.add(message.tp)
                await self.app.consumer.seek(message.tp, expected)
            await stream.ack(event)
            return None
        self._seeking.discard(message.tp)
        return state

    def _make_ingest_agent(self, kind: str) -> Any:
        settings, metrics = self.settings, self.metrics
        rules = InputRules(settings.max_message_bytes, settings.max_future_ms, settings.topic)

        async def ingest(stream: Any) -> None:
            stream = stream.noack()
            async for event in stream.events():
                state = await self._admit(stream, event)
                if state is None:
                    continue
                started = time.perf_counter()
                message = event.message
                async with self.state.lock:
                    result = ingest_message(self.state, state, kind, message, int(time.time() * 1000), rules)
                    self.state.record(state, message.topic, message.offset, stream, event)
                if result is None:  # dead-lettered as internal_error: counted by self.state.errors
                    metrics.observe(kind, False, time.perf_counter() - started)
                else:
                    metrics.observe(kind, not isinstance(result, Invalid), time.perf_counter() - started,
                                    result.code if isinstance(result, Invalid) else None)
                if len(self.state.unacked) >= settings.flush_every_events:
                    await self.flush()

        ingest.__name__ = f"ingest_{kind.replace('-', '_')}"
        return ingest

    async def _messages_agent(self, stream: Any) -> None:
        stream = stream.noack()
        async for event in stream.events():
            state = await self._admit(stream, event)
            if state is None:
                continue
            message = event.message
            async with self.state.lock:
                try:
                    self.state.apply_messages(state, decode_partition_batch(message.value))
                except Exception as exc:  # noqa: BLE001 - one message must not stop the worker (errors.py)
                    message_failed(self.state, "applying", exc, message, self.settings.max_message_bytes)
                self.state.record(state, message.topic, message.offset, stream, event)
            if len(self.state.unacked) >= self.settings.flush_every_events:
                await self.flush()

    async def _commands_agent(self, stream: Any) -> None:
        """``pymk refresh``: {"command": "refresh", "user": U | "all": true, "reembed": bool, "rank": bool}, keyed by
        user (or
        sent to each partition for all); the work is done by the next flush, like any other change."""
        stream = stream.noack()
        async for event in stream.events():
            state = await self._admit(stream, event)
            if state is None:
                continue
            message = event.message
            async with self.state.lock:
                try:
                    command = json.loads(message.value)
                    if "user" in command:
                        # one user, when some event created it (a refresh must not create a user either)
                        user = int(command["user"])
                        users = ([user] if 0 <= user <= MAX_USER_ID and self.partition_of(user) == state.partition
                                 and state.knows(user) else [])
                    else:  # every user some event created: with connections or a profile
                        users = sorted(set(state.graph.local_users()) | set(state.profiles.local_users()))
                    if command.get("rank", True):
                        state.forced_refresh.update(users)
                    if command.get("reembed"):
                        state.forced_reembed.update(users)
                except (ValueError, KeyError, TypeError) as exc:
                    log.warning("ignoring malformed command at %s:%d: %s", message.topic, message.offset, exc)
                except Exception as exc:  # noqa: BLE001 - one message must not stop the worker (errors.py)
                    message_failed(self.state, "applying", exc, message, self.settings.max_message_bytes)
                self.state.record(state, message.topic, message.offset, stream, event)

    def _user_failed(self, stage: str, exc: Exception, state: PartitionState, user: int) -> None:
        """The refresher's callback: one user's embedding or list failed."""
        topic = self.settings.topic("embeddings" if stage == "embedding" else "recommendations")
        self.state.user_failed(stage, exc, topic, state.partition, user)

    def apply(self, state: PartitionState, event: InputEvent, raw: bytes) -> None:
        """Apply a valid event to the partition's state (streams/ingest.py)."""
        apply_event(state, event, raw, self.partition_of, self.settings.topic)

    # ---- commit ---------------------------------------------------------------------------------------------
    async def flush(self) -> None:
        await self.state.flush()

    async def _flush_timer(self) -> None:
        await self.flush()

    async def _gc_timer(self) -> None:
        self.gc_pauses.tend()

    async def _rank_between_flushes(self) -> None:
        """Send the outboxes, embed and rank owed lists between flushes (WorkerState.refresh_now), in slices, while
        the input keeps up (at most ``refresh_keeping_up_backlog`` messages not applied); the agents waiting for
        the state lock get it between two slices (the lock is first come, first served), so an event waits for
        one slice at most. Past that backlog it waits: the flushes rank then, with their own budget and catch-up
        rule (a list ranked on state far behind its input is stale when published, and the input's delay is
        every list's delay). With nothing to do it looks again every ``BETWEEN_FLUSHES_IDLE_S``. A failure is not
        caught, as in the flush: users it marked refreshed may have no list sent, so the worker must stop before
        a flush makes that durable (a restart re-reads the events and owes the lists again)."""
        slice_s = self.settings.refresh_between_flushes_ms / 1000.0
        loop = asyncio.get_running_loop()
        while True:
            # Input first, up to INPUT_FIRST_S: an agent applies one message per turn of the lock, so without
            # this wait it applied one per slice and the input fell behind (the partition messages most: one
            # per target partition and slice). The waits are short, so a busy worker still ranks.
            until = loop.time() + self.INPUT_FIRST_S
            while self.input_backlog() > 0 and loop.time() < until:
                await asyncio.sleep(0.001)
            limit = self.state.between_flushes_max_backlog or 0
            if self.input_backlog() > limit or not await self.state.refresh_now(slice_s):
                await asyncio.sleep(self.BETWEEN_FLUSHES_IDLE_S)
            else:
                await asyncio.sleep(0)  # let the agents (and the producer's sender) run between slices

    async def _reseek_timer(self) -> None:
        """Start (or restart) the re-read of a partition whose state is behind while its consumer will not deliver
        what is missing: faust delivers only messages past its read offset of a partition. After a partition
        moved here without its state, that offset is the group's committed one, so a topic-partition that gets
        no new message (dismissals, say) never triggered the re-read in :meth:`_admit`; and the rest of a batch
        fetched before a seek moves the read offset past the seek's target, so the re-read messages are
        dropped. Both were seen with two workers starting on a filled topic: moved partitions never caught up.
        A partition is stalled when its consumer has read everything it knows of (read offset at the end)
        while the state has applied none of the rest for ``STALL_S``; a busy worker makes progress or has not
        read to the end, so it is left alone."""
        consumer, now = self.app.consumer, time.monotonic()
        behind = self._backlog_by_tp()
        for tp in list(self._stalled):
            if not behind.get(tp, (0, 0))[0]:
                del self._stalled[tp]
        for tp, (missing, end) in behind.items():
            state = self.state.state_for(tp.partition)
            if not missing or state is None or end is None:  # end unknown: not fetched yet, nothing to re-read
                continue
            target = state.next_offset(tp.topic)
            read = consumer._read_offset.get(tp)  # faust's own, no public reader
            if read is None or read < end - 1:
                self._stalled.pop(tp, None)  # messages still to be delivered: not stalled
                continue
            seen_target, since = self._stalled.setdefault(tp, (target, now))
            if seen_target != target:
                self._stalled[tp] = (target, now)  # progress
            elif now - since >= self.STALL_S:
                log.warning("%s: the state has applied up to offset %d, the consumer has read up to %d: "
                            "re-reading", tp, target - 1, read)
                self._seeking.add(tp)
                self._stalled[tp] = (target, now)
                await consumer.seek(tp, target)

    async def _reload_timer(self) -> None:
        """Hot reload: a new model version serves from the next flush on; nothing is lost or re-read. A new
        GraphSAGE model re-embeds every local user (vectors of two models are not comparable)."""
        assert self.models is not None
        try:
            # Loading (and preparing the ranker's compiled evaluator: seconds on a machine's first compile) runs
            # on a thread, so the event loop keeps applying input and publishing lists; only the swap takes the lock.
            pending = await asyncio.to_thread(self.models.load_changed)
        except Exception:  # noqa: BLE001 - a bad model must not stop the worker: keep serving the old one
            log.exception("model reload failed")
            return
        async with self.state.lock:
            try:
                changed = self.models.apply(pending)
            except Exception:  # noqa: BLE001 - a bad model must not stop the worker: keep serving the old one
                log.exception("model reload failed")
                return
            if "embeddings" in changed:
                for state in self.state.owned.values():
                    state.forced_reembed.update(state.embeddings.local_users())

    # ---- reads for the debug API ------------------------------------------------------------------------------
    def degree_of(self, user: int) -> tuple[int, int | None]:
        state = self.state.state_for(self.partition_of(user))
        if state is not None:
            return state.graph.degree_with_ts(user)
        return self.globals.degree(user)

    def degree_value(self, user: int) -> int:
        """Any user's degree, the cheap way (ranking reads it for thousands of candidates per list)."""
        state = self.state.state_for(self.partition_of(user))
        return state.graph.degree(user) if state is not None else self.globals.degree(user)[0]

    def profile_value(self, user: int) -> Any:
        state = self.state.state_for(self.partition_of(user))
        return state.profiles.profile(user) if state is not None else self.globals.profile(user)[0]

    def input_backlog(self) -> int:
        """Messages of this worker's partitions (inputs, partition messages, commands) not applied yet: the consumer's
        last known end offsets minus the state's next offsets. No broker round trip: read at every flush."""
        return sum(behind for behind, _ in self._backlog_by_tp().values())

    def partition_behind(self, partition: int) -> bool:
        """Whether this worker's state of ``partition`` has not applied all its input yet (a partition that moved
        here without its state re-reads it: a user unknown now may be known in a moment)."""
        return any(behind for tp, (behind, _) in self._backlog_by_tp().items() if tp.partition == partition)

    def _backlog_by_tp(self) -> dict[Any, tuple[int, int | None]]:
        """(messages not applied, last known end offset) per topic-partition of this worker's state; (1, None)
        for one not fetched yet."""
        consumer = self.app.consumer
        # commands too: a partition that moved here re-reads them like the rest, and that re-read can stall the same
        # way (the rank command of `pymk refresh` was then never applied by the worker the partition moved to)
        topics = [topic.get_topic_name()
                  for topic in (*self.input_topics.values(), self.messages_topic, self.commands_topic)]
        out: dict[Any, tuple[int, int | None]] = {}
        for partition, state in self.state.owned.items():
            for topic in topics:
                tp = TP(topic, partition)
                try:
                    end = consumer.highwater(tp)
                except Exception:  # noqa: BLE001 - not assigned to the consumer (yet): nothing known
                    end = None
                # Not fetched yet (just assigned): whether the state is behind is not known, so it counts as
                # behind by one. Counted as caught up, a worker that had just been given a partition without its
                # state said it owed nothing for the seconds before its first fetch: wait-idle returned, and the
                # re-read of thousands of messages started after it (seen in the rebalance test).
                out[tp] = (max(0, end - state.next_offset(topic)), end) if end is not None else (1, None)
        return out

    def consumer_view(self) -> list[dict[str, Any]]:
        """For /stats: every topic-partition this worker is behind on, with what its consumer knows of it (a
        partition that does not catch up shows why: paused, buffer full, read offset past the state)."""
        consumer = self.app.consumer
        out = []
        for tp, (behind, end) in sorted(self._backlog_by_tp().items()):
            if not behind:
                continue
            state = self.state.state_for(tp.partition)
            out.append({"topic": tp.topic, "partition": tp.partition, "behind": behind, "end": end,
                        "next_to_apply": state.next_offset(tp.topic) if state is not None else None,
                        "read_offset": consumer._read_offset.get(tp),  # faust's internals: no public reader
                        "paused": tp in consumer._paused_partitions,
                        "buffer_full": tp in consumer._buffered_partitions,
                        "re_reading": tp in self._seeking})
        return out

    def facts_value(self, user: int) -> tuple[int, Any, Any]:
        """(degree, connection activity, profile) of any user, for Stage 2's table (streams/user_facts.py): from
        the user's partition when this worker owns it, else from user-globals."""
        state = self.state.state_for(self.partition_of(user))
        if state is None:
            return self.globals.degree(user)[0], self.globals.activity(user), self.globals.profile(user)[0]
        return state.graph.degree(user), state.graph.connection_activity(user), state.profiles.profile(user)

    def user_page(self, user: int) -> str | None:
        """The HTML debug page of a local user (None: its partition is not open here)."""
        from pymk.streams.debug_page import user_page

        facts, recommendations = self.user_view(user), self.recommendations_view(user)
        if facts is None or recommendations is None:
            return None
        features = {}
        for item in recommendations["items"]:
            pair = self.pair_view(user, int(item["candidate"]))
            if pair is not None:
                features[int(item["candidate"])] = pair["features"]
        return user_page(facts, recommendations, features, self.state.events_of(user))

    def unknown_users(self, ids: list[int]) -> list[int]:
        """Of a debug query's ids, the ones no event named: the query's user (its partition is open here) and a
        second user of this worker's partitions (one elsewhere is read from what this worker knows of it)."""
        unknown = []
        for user in ids:
            state = self.state.state_for(self.partition_of(user))
            if state is not None and not state.knows(user):
                unknown.append(user)
        return unknown

    def user_view(self, user: int) -> dict[str, Any] | None:
        state = self.state.state_for(self.partition_of(user))
        if state is None:
            return None
        neighbours = state.graph.neighbours(user)
        degree, degree_ts = self.degree_of(user)
        sample = sorted(neighbours.items(), key=lambda item: (-item[1], item[0]))[:20]
        profile = state.profiles.profile(user)
        views = state.behaviour.profile_view_counts(user)
        return {
            "user": user,
            "partition": state.partition,
            "degree": {"value": degree, "ts": degree_ts},
            "neighbours_sample": [{"user": n, "since": ts} for n, ts in sample],
            "two_hop_candidates": len(state.graph.common_row(user)),
            "profile": None if profile is None else profile.to_dict(),
            "profile_field_ts": state.profiles.field_timestamps(user),
            "signed_up_at": state.profiles.signed_up_at(user),
            "embedding": self._embedding_view(state, user),
            "last_recommendation": self._last_list_view(state, user),
            "pending_work": state.work.rows.get(user),
            "behaviour": {
                "profiles_viewed": sum(1 for out, _ in views.values() if out),
                "viewed_by": sum(1 for _, inbound in views.values() if inbound),
                "dismissed": len(state.behaviour.dismissed_candidates(user)),
                "items_engaged": len(state.behaviour.engaged_items(user)),
            },
        }

    def _embedding_view(self, state: PartitionState, user: int) -> dict[str, Any] | None:
        record = state.embeddings.get(user)
        if record is None or not record.vector.size:  # never embedded, or deleted (nothing to embed from)
            return None
        return {"version": record.version, "computed_at": record.ts, "model_version": record.model_version,
                "in_index": self.index.describe(user)}

    def _last_list_view(self, state: PartitionState, user: int) -> dict[str, Any] | None:
        published = state.published.get(user)
        if published is None:
            return None
        return {"generated_at": published.generated_at, "model_version": published.model_version,
                "items": len(published.items)}

    def recommendations_view(self, user: int) -> dict[str, Any] | None:
        state = self.state.state_for(self.partition_of(user))
        if state is None:
            return None
        published = state.published.get(user)
        if published is None:
            return {"user": user, "generated_at": None, "model_version": None, "items": []}
        return published.to_dict()

    def neighbours_view(self, user: int, k: int, with_vector: bool = False) -> dict[str, Any]:
        """ANN neighbours from this worker's copy of the global index (every worker holds every user)."""
        found = self.index.neighbours(user, k)
        body: dict[str, Any] = {"user": user, "k": k, "embedding": self.index.describe(user),
                                "neighbours": [{"user": v, "cosine": float(score)} for v, score in found]}
        if with_vector:
            vector = self.index.vector(user)
            body["vector"] = None if vector is None else [float(x) for x in vector]
        return body

    def candidates_view(self, user: int) -> dict[str, Any] | None:
        state = self.state.state_for(self.partition_of(user))
        if state is None:
            return None
        counts = state.graph.common_neighbor_counts(user)
        _, scores = state.graph.two_hop_scores(user)
        neighbours = state.graph.neighbours(user)
        return {"user": user, "candidates": {
            str(v): {"common_neighbor_count": n, "adamic_adar_score": scores.get(v, 0.0), "connected": v in neighbours}
            for v, n in counts.items()}}

    def pair_view(self, user: int, candidate: int) -> dict[str, Any] | None:
        state = self.state.state_for(self.partition_of(user))
        if state is None:
            return None
        features = graph_pair_features(state.graph, user, candidate, self.degree_of)
        as_of = int(time.time() * 1000)
        for name, (value, ts) in state.behaviour.pair_features(user, candidate, as_of).items():
            features[name] = FeatureValue(value, ts)
        own_profile = state.profiles.profile(user)
        own_ts = state.profiles.field_timestamps(user)
        other_profile, other_ts = self.profile_of(candidate)
        stamps = profile_feature_timestamps(own_ts, other_ts)
        for name, value in profile_features(own_profile, other_profile).items():
            features[name] = FeatureValue(value, stamps[name])
        return {"user": user, "candidate": candidate,
                "features": {name: value.to_dict() for name, value in features.items()},
                "mutual_examples": state.graph.common_neighbors(user, candidate)[:3]}

    def profile_of(self, user: int) -> tuple[Any, dict[str, int]]:
        state = self.state.state_for(self.partition_of(user))
        if state is not None:
            return state.profiles.profile(user), state.profiles.field_timestamps(user)
        return self.globals.profile(user)

    def _register_views(self) -> None:
        app, metrics, routing_topic = self.app, self.metrics, self.input_topics["connections"].get_topic_name()

        def moving(web: Any, partition: int, why: str) -> Any:
            """The documented retryable answer: the partition has no reachable owner right now (a rebalance is
            moving it, or the group has not yet noticed that its owner died). Lasts at most the session timeout
            plus a rebalance; then the same request is answered by the new owner."""
            return web.json({"error": f"partition {partition} has no reachable owner right now: {why}",
                             "retryable": True, "partition": partition}, status=503,
                            headers={"Retry-After": str(ROUTE_RETRY_AFTER_S)})

        def owner_of(partition: int) -> URL | None:
            """The owner's URL in the group's last assignment (faust's own lookup re-partitions the key with the
            producer, which fails while the producer has no metadata for the topic yet: just after a start)."""
            for url, topics in app.router.external_topics_metadata().items():
                if partition in topics.get(routing_topic, ()):
                    return URL(url)
            return None

        async def routed(web: Any, request: Any, key: str, local: Any) -> Any:
            partition = self.partition_of(int(key))
            # The partition's state is open here only on its owner (faust rebalances eagerly: every partition
            # is closed before any is assigned again), so this answers even when the group's routing map is
            # stale — faust's map is only refreshed by the next assignment.
            if self.state.state_for(partition) is not None:
                return await local()
            # Forwarded once at most: two workers with stale maps pointing at each other would bounce it.
            if request.headers.get(FORWARDED_HEADER):
                return moving(web, partition, "forwarded here, not (or no longer) assigned here")
            owner = owner_of(partition)
            if owner is None:
                return moving(web, partition, "no owner assigned yet")
            if (owner.host, owner.port) == (app.conf.canonical_url.host, app.conf.canonical_url.port):
                return moving(web, partition, "assigned here, not yet opened")
            url = request.url.with_host(owner.host).with_port(owner.port)
            try:
                async with app.http_client.get(url, headers={FORWARDED_HEADER: "1"},
                                               timeout=aiohttp.ClientTimeout(total=ROUTE_TIMEOUT_S)) as response:
                    retry = response.headers.get("Retry-After")
                    return web.bytes(await response.read(), content_type=response.content_type,
                                     status=response.status, headers={"Retry-After": retry} if retry else None)
            except (TimeoutError, aiohttp.ClientError) as exc:  # a killed owner, until the group notices
                return moving(web, partition, f"its owner {owner} does not answer ({type(exc).__name__})")

        def parse_user(text: str) -> int | None:
            """A user id of the contract: ASCII decimal digits, below 2^63 (``str.isdigit`` alone takes other
            scripts' digits, and a larger id overflows the int64 arrays of ranking)."""
            if not (text.isascii() and text.isdigit()) or len(text) > 19:
                return None
            user = int(text)
            return user if user <= MAX_USER_ID else None

        @app.page("/health")
        async def health(web: Any, request: Any) -> Any:
            return web.json({"status": "ok", "app_id": self.settings.app_id,
                             "partitions": sorted(self.state.owned),
                             "pending_work": sum(len(state.work) for state in self.state.owned.values()),
                             # messages of its partitions not applied yet, as this worker sees them: after a
                             # partition moved here without its state, the group's lag is 0 while it re-reads
                             "input_backlog": self.input_backlog(),
                             # lists owed now (the deferred ones included) and the oldest owed change's age
                             "lists_owed": sum(1 for state in self.state.owned.values()
                                               for row in state.work.rows.values() if row[1]),
                             "oldest_owed_ms": self.refresher.stats.oldest_owed_ms if self.refresher else 0,
                             "uptime_s": round(time.time() - metrics.started_at, 1)})

        @app.page("/metrics")
        async def metrics_view(web: Any, request: Any) -> Any:
            from pymk.streams.lag import consumer_lag

            try:  # the group's lag, read from the broker (a blocking client, so off the event loop)
                lag = await asyncio.to_thread(consumer_lag, self.settings)
            except Exception:
                lag = None
            return web.bytes(metrics.render(lag), headers={"Content-Type": METRICS_CONTENT_TYPE})

        @app.page("/stats")
        async def stats(web: Any, request: Any) -> Any:
            tower_index = self.refresher.tower_index if self.refresher is not None else None
            tower = ({} if tower_index is None else
                     {"tower_space": {"users": len(tower_index), "model_version": tower_index.model_version,
                                      "recomputed": tower_index.recomputed}})
            refresh: dict[str, Any] | None = None
            if self.refresher is not None:
                refresh = dict(self.refresher.stats.__dict__)
                delays = sorted(refresh.pop("last_delays_ms"))
                refresh["recent_delay_ms"] = ({"p50": delays[len(delays) // 2],
                                               "p99": delays[int(len(delays) * 0.99)]} if delays else None)
                refresh["lists_owed"] = sum(1 for state in self.state.owned.values()
                                            for row in state.work.rows.values() if row[1])
            # the offsets show how far each full-table reader has read its topic (tests wait for the end)
            return web.json({**metrics.snapshot(), "internal_errors": dict(self.state.errors.by_stage),
                             "state": self.state.describe(), "globals_users": len(self.globals),
                             "globals_offsets": self.globals.offsets,
                             "index": {"users": len(self.index.index), "records_applied": self.index.records_applied,
                                       "caught_up": self.index.caught_up.is_set(), "offsets": self.index.offsets,
                                       "ann_space": self.settings.ann_space, **tower},
                             "refresh": refresh, "models": self.models.describe() if self.models else None,
                             # kept lists (bytes, entries, hits, misses, evictions, full builds by reason) and the
                             # shadow check of incremental lists (checked, equal, equal_share)
                             "lists": self.refresher.describe_lists() if self.refresher is not None else None,
                             "gc": self.gc_pauses.snapshot(),
                             "behind": self.consumer_view()})

        memory_baseline: list[Any] = []  # the previous /memory snapshot, for ?diff=1

        @app.page("/memory")
        async def memory(web: Any, request: Any) -> Any:
            """Where this process's Python memory is, by allocation site (top 25 lines), when tracemalloc traces
            (start the worker with PYTHONTRACEMALLOC=1; it slows allocation, so never by default). ``?diff=1``:
            the growth since the previous call. RSS and the row-cache and RocksDB figures come with it;
            ``?pymalloc=1`` adds Python's small-object allocator (pymk/process_memory.py: pymalloc_bytes)."""
            import tracemalloc

            rocksdb_properties: dict[str, int] = {}
            for partition_state in self.state.owned.values():
                for name, value in partition_state.store.memory_properties().items():
                    rocksdb_properties[name] = rocksdb_properties.get(name, 0) + value
            kept = self.refresher.lists if self.refresher is not None else None
            list_cache = ({key: value for key, value in kept.describe().items()
                           if key in ("bytes", "max_bytes", "entries", "hits", "misses", "evictions")}
                          if kept is not None else None)
            answer: dict[str, Any] = {"rss_bytes": rss_bytes(),
                                      "row_cache_bytes": sum(s.cache_budget.estimated_bytes
                                                             for s in self.state.owned.values()),
                                      "rocksdb_memory_bytes": (self.state.rocks_memory.usage_bytes()
                                                               if self.state.rocks_memory is not None else None),
                                      # summed over the databases; memtables are inside rocksdb_memory_bytes too
                                      "rocksdb_properties_bytes": rocksdb_properties,
                                      "ann_index_bytes": self.index.index.memory_bytes(),
                                      # the kept lists (ranking/incremental.py), bounded by PYMK_LIST_CACHE_BYTES
                                      "list_cache": list_cache,
                                      "malloc_bytes": malloc_bytes(),
                                      "pymalloc_bytes": (pymalloc_bytes() if request.query.get("pymalloc") == "1"
                                                         else None),
                                      "tracing": tracemalloc.is_tracing()}
            if tracemalloc.is_tracing():
                snapshot = tracemalloc.take_snapshot().filter_traces(
                    [tracemalloc.Filter(False, tracemalloc.__file__)])
                diff = request.query.get("diff") == "1" and memory_baseline
                stats = (snapshot.compare_to(memory_baseline[0], "lineno") if diff
                         else snapshot.statistics("lineno"))
                answer["traced_bytes"] = tracemalloc.get_traced_memory()[0]
                answer["top"] = [{"where": str(stat.traceback[0]), "bytes": stat.size, "count": stat.count,
                                  **({"growth_bytes": stat.size_diff} if diff else {})}
                                 for stat in stats[:25]]
                memory_baseline[:] = [snapshot]
            return web.json(answer)

        def owner_page(path: str, view: Any, html: bool = False) -> None:
            """A GET page about user ``u`` (and maybe ``v``), answered by the worker owning u's partition: the
            view's JSON, or with ``html`` its text as an HTML page."""

            @app.page(path, name=path)
            async def page(web: Any, request: Any, u: str, v: str | None = None) -> Any:
                ids = [parse_user(x) for x in (u, v) if x is not None]
                if None in ids:
                    return web.json({"error": BAD_USER_ID}, status=400)

                async def local() -> Any:
                    # read-only: a user no event named is answered 404 and leaves nothing behind (no row cached
                    # or written, so `pymk refresh --all` does not publish a list for it)
                    unknown = self.unknown_users(ids)
                    if unknown:
                        partition = self.partition_of(unknown[0])
                        if self.partition_behind(partition):  # its events may not be re-applied yet
                            return moving(web, partition, "its state is catching up with its input")
                        return web.json({"error": f"user {unknown[0]} is unknown: no event has named it "
                                                  "(in this worker's partitions)", "user": unknown[0]}, status=404)
                    body = view(*ids)
                    if body is None:
                        return moving(web, self.partition_of(ids[0]), "not open here")
                    if html:
                        return web.bytes(body.encode(), headers={"Content-Type": "text/html; charset=utf-8"})
                    return web.json(body)

                return await routed(web, request, u, local)

        owner_page("/users/{u}", self.user_view)
        # the debug page of one user (streams/debug_page.py), for people who would rather look than read
        owner_page("/users/{u}/page", self.user_page, html=True)
        owner_page("/users/{u}/candidates", self.candidates_view)
        owner_page("/features/{u}/{v}", self.pair_view)
        owner_page("/recommendations/{u}", self.recommendations_view)

        @app.page("/neighbours/{u}", name="/neighbours/{u}")
        async def neighbours(web: Any, request: Any, u: str) -> Any:
            user = parse_user(u)
            k_text = request.query.get("k", "20")
            if user is None:
                return web.json({"error": BAD_USER_ID}, status=400)
            if not (k_text.isascii() and k_text.isdigit()) or not 0 < int(k_text) <= 10_000:
                return web.json({"error": "usage: /neighbours/{user id}?k=1..10000"}, status=400)
            return web.json(self.neighbours_view(user, int(k_text), request.query.get("vector") == "1"))


def run_worker(settings: Settings, loglevel: str = "info") -> None:
    """Run one worker in the foreground until SIGINT/SIGTERM (``pymk worker``)."""
    from pymk.streams.topics import ensure_topics

    ensure_topics(settings)
    (settings.worker_dir / settings.app_id).mkdir(parents=True, exist_ok=True)
    pymk_app = PymkApp(settings)
    worker = faust.Worker(pymk_app.app, loglevel=loglevel, quiet=True)
    worker.execute_from_commandline()
