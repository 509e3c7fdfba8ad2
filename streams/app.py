"""The faust-streaming application of a pymk worker.

Thin glue: agents take raw messages of the five input topics, validate them (:mod:`pymk.validation`),
dead-letter what cannot be applied, and hand events to the pure feature code through :class:`WorkerState`,
which owns one RocksDB database per assigned partition. Cross-partition updates travel over the internal
``partition-messages`` topic (co-partitioned with the inputs, so its partition p is processed by the owner of
p); every worker reads the compacted ``user-globals`` topic in full for the degrees of remote users.

By concern: event dispatch is :mod:`pymk.streams.ingest`, how far the state is behind its input (and the
re-reads) :mod:`pymk.streams.input_progress`, the debug HTTP API and its forwarding :mod:`pymk.streams.debug_http`,
the commit protocol :class:`WorkerState`, lists and embeddings :mod:`pymk.streams.refresh`. This module wires them
to faust: topics, agents, timers, partition assignment.
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
from yarl import URL

from pymk.events import MAX_USER_ID, UNSHOWN_KIND
from pymk.features.storage import RocksMemory
from pymk.settings import INPUT_KINDS, Settings
from pymk.streams.ann_shards import ShardedAnn
from pymk.streams.codec import decode_partition_batch
from pymk.streams.debug_http import DebugViews
from pymk.streams.gc_pauses import GcPauses
from pymk.streams.global_index import GlobalIndex
from pymk.streams.globals import UserGlobals
from pymk.streams.ingest import InputRules, ingest_message, message_failed
from pymk.streams.input_progress import InputProgress
from pymk.streams.metrics import WorkerMetrics
from pymk.streams.models import Models
from pymk.streams.partitioning import partition_for_user
from pymk.streams.refresh import Refresher
from pymk.streams.remote_facts import RemoteFacts
from pymk.streams.state import OutputTopics, PartitionState, WorkerState
from pymk.streams.user_facts import UserFacts
from pymk.validation import Invalid

log = logging.getLogger(__name__)

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
        # the reads it is given (degree_value, …) look at self.state when called, once the state exists
        self.refresher = (Refresher(settings, self.index, self.models, self.degree_value, self.profile_value,
                                    self.globals.activity, self.globals.most_active,
                                    facts=UserFacts(self.facts_value))
                          if self.models is not None else None)
        if self.refresher is not None and self.refresher.facts is not None:
            facts = self.refresher.facts
            self.globals.listeners.append(lambda user: facts.invalidate((user,)))
        # sharded: Stage 1 gathers every shard's answer; so does /neighbours, with its own gatherer (its counts in
        # /stats stay the lists')
        self.debug_shards: ShardedAnn | None = None
        if settings.ann_mode == "sharded":
            self.debug_shards = self._shard_gatherer()
            if self.refresher is not None:
                self.refresher.shards = self._shard_gatherer()
        # reachable globals: remote users' facts asked of their owners (streams/remote_facts.py)
        self.remote_facts: RemoteFacts | None = None
        if settings.globals_mode == "reachable":
            self.remote_facts = RemoteFacts(self.globals, self.state_of_user, self._shard_peers, self._post_bytes,
                                            settings.globals_fetch_timeout_ms / 1000.0, self.index)
            if self.index.reachable:  # sharded too: the vectors of the users the globals hold, no others
                self.index.holds = self.globals.holds
                self.index.on_miss = self.globals.missing
                self.globals.evict_listeners.append(self.index.forget)
            working_set = 2 * settings.ann_shard_batch * settings.candidates_max
            if 0 < settings.globals_held_max_users < working_set:
                # what a slice reads at once (its gathered users' candidates, twice for the embeddings and the next
                # slice) must fit, or each answer evicts what the waiting lists need (docs/capacity.md)
                log.warning("PYMK_GLOBALS_HELD_MAX_USERS=%d is below a slice's working set (~%d users): lists and "
                            "embeddings may wait for facts for a long time", settings.globals_held_max_users,
                            working_set)
            if self.refresher is not None:
                self.refresher.remote_facts = self.remote_facts
        if self.refresher is not None:
            self.refresher.on_user_error = self._user_failed
            self.refresher.delays = self.metrics.list_refresh_seconds
        between_flushes = self.refresher is not None and settings.refresh_between_flushes_ms > 0
        self.state = WorkerState(worker_home / "state", partitions, self.partition_of,
                                 settings.topic("partition-messages"), settings.topic("user-globals"),
                                 settings.topic("dead-letter"), self._send,
                                 max_item_fanout=settings.max_item_fanout or None,
                                 cache_bytes_per_partition=settings.state_cache_mb * 2**20 // partitions,
                                 rocks_memory=RocksMemory(settings.rocksdb_memory_mb * 2**20),
                                 refresher=self.refresher,
                                 materialise_common=settings.common_counts == "materialised",
                                 hub_degree=settings.hub_degree,
                                 topics=OutputTopics(embeddings=settings.topic("embeddings"),
                                                     recommendations=settings.topic("recommendations"),
                                                     impressions=settings.topic("impressions"),
                                                     impressions_unshown=settings.topic(UNSHOWN_KIND)),
                                 backlog_of=lambda: self.progress.backlog(),
                                 between_flushes_max_backlog=(settings.refresh_keeping_up_backlog if between_flushes
                                                              else None),
                                 error_listener=self.metrics.internal_error,
                                 partition_tops=(settings.globals_popular_per_partition
                                                 if settings.globals_mode == "reachable" else 0))
        # how far the state is behind its input (reads faust's consumer internals: the one module that does)
        self.progress = InputProgress(self.app, self.state,
                                      [topic.get_topic_name() for topic in (*self.input_topics.values(),
                                                                            self.messages_topic, self.commands_topic)])
        for kind, topic in self.input_topics.items():
            self.app.agent(topic, name=f"pymk.ingest.{kind}")(self._make_ingest_agent(kind))
        self.app.agent(self.messages_topic, name="pymk.partition-messages")(self._messages_agent)
        self.app.agent(self.commands_topic, name="pymk.commands")(self._commands_agent)
        self.app.timer(settings.flush_interval_ms / 1000.0)(self._flush_timer)
        self.app.timer(1.0)(self.progress.reseek_stalled)
        self.app.timer(1.0)(self._gc_timer)
        if between_flushes:
            self.app.task(self._rank_between_flushes)
        if self.models is not None:
            self.app.timer(settings.model_reload_interval_s)(self._reload_timer)
        self.app.task(self.globals.run)
        self.app.task(self.index.run)
        self.app.on_partitions_assigned.connect(self._on_assigned)
        self.app.on_partitions_revoked.connect(self._on_revoked)
        self.app.on_before_shutdown.connect(self._on_shutdown)
        DebugViews(self).register()

    # ---- producing (used by the flush) --------------------------------------------------------------------
    async def _send(self, topic: str, key: bytes | None, value: bytes, partition: int | None) -> Any:
        return await self.app.producer.send(topic, key, value, partition, None, None)

    # ---- partition ownership ------------------------------------------------------------------------------
    def _our_partitions(self, tps: set[Any]) -> set[int]:
        ours = {t.get_topic_name() for t in (*self.input_topics.values(), self.messages_topic, self.commands_topic)}
        return {tp.partition for tp in tps if tp.topic in ours}

    async def _on_assigned(self, sender: Any, assigned: set[Any], **kwargs: Any) -> None:
        self.state.open_partitions(self._our_partitions(assigned))
        # sharded ANN: the graph holds the assigned partitions' users (revoked ones are dropped here, not at the
        # revocation: faust revokes every partition before assigning, and most come back)
        self.index.assign(set(self.state.owned))

    # ---- sharded ANN (streams/ann_shards.py) ------------------------------------------------------------------
    def _shard_gatherer(self) -> ShardedAnn:
        settings = self.settings
        return ShardedAnn(self.index, settings.partitions, self._shard_peers, self._post_bytes,
                          settings.ann_shard_timeout_ms / 1000.0, settings.ann_shard_k_sigmas)

    def _shard_peers(self) -> list[str]:
        """The other workers owning partitions, in the group's last assignment."""
        routing = self.input_topics["connections"].get_topic_name()
        me = self.app.conf.canonical_url
        out = []
        for url, topics in self.app.router.external_topics_metadata().items():
            peer = URL(url)
            if topics.get(routing) and (peer.host, peer.port) != (me.host, me.port):
                out.append(str(peer.with_path("")).rstrip("/"))
        return out

    async def _post_bytes(self, url: str, body: bytes, timeout_s: float) -> bytes:
        async with self.app.http_client.post(url, data=body,
                                             timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
            response.raise_for_status()
            return await response.read()

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
    def _make_ingest_agent(self, kind: str) -> Any:
        settings, metrics = self.settings, self.metrics
        rules = InputRules(settings.max_message_bytes, settings.max_future_ms, settings.topic)

        async def ingest(stream: Any) -> None:
            stream = stream.noack()
            async for event in stream.events():
                state = await self.progress.admit(stream, event)
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
            state = await self.progress.admit(stream, event)
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
            state = await self.progress.admit(stream, event)
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
            while self.progress.backlog() > 0 and loop.time() < until:
                await asyncio.sleep(0.001)
            limit = self.state.between_flushes_max_backlog or 0
            if self.progress.backlog() > limit or not await self.state.refresh_now(slice_s):
                await asyncio.sleep(self.BETWEEN_FLUSHES_IDLE_S)
            else:
                await asyncio.sleep(0)  # let the agents (and the producer's sender) run between slices

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


    # ---- reads for ranking (any user: the local partition's state, else user-globals) -----------------------------
    def state_of_user(self, user: int) -> PartitionState | None:
        """The state of the user's partition when this worker owns it (else None: read from user-globals)."""
        return self.state.state_for(self.partition_of(user))

    def degree_value(self, user: int) -> int:
        """Any user's degree, the cheap way (ranking reads it for thousands of candidates per list)."""
        state = self.state.state_for(self.partition_of(user))
        return state.graph.degree(user) if state is not None else self.globals.degree(user)[0]

    def profile_value(self, user: int) -> Any:
        state = self.state.state_for(self.partition_of(user))
        return state.profiles.profile(user) if state is not None else self.globals.profile(user)[0]

    def facts_value(self, user: int) -> tuple[int, Any, Any]:
        """(degree, connection activity, profile) of any user, for Stage 2's table (streams/user_facts.py): from
        the user's partition when this worker owns it, else from user-globals."""
        state = self.state.state_for(self.partition_of(user))
        if state is None:
            return self.globals.degree(user)[0], self.globals.activity(user), self.globals.profile(user)[0]
        return state.graph.degree(user), state.graph.connection_activity(user), state.profiles.profile(user)


def run_worker(settings: Settings, loglevel: str = "info") -> None:
    """Run one worker in the foreground until SIGINT/SIGTERM (``pymk worker``)."""
    from pymk.streams.topics import ensure_topics

    ensure_topics(settings)
    (settings.worker_dir / settings.app_id).mkdir(parents=True, exist_ok=True)
    pymk_app = PymkApp(settings)
    worker = faust.Worker(pymk_app.app, loglevel=loglevel, quiet=True)
    worker.execute_from_commandline()
