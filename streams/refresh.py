"""What a flush does for the users whose state changed: embed them (GraphSAGE, then the index) and publish
their refreshed top-k list.

Called by :meth:`WorkerState.flush` under its lock, before the outputs are produced, so a list or an embedding
goes out in the same transaction as the state change that caused it (see the commit order in state.py).
Bursts coalesce: a user touched 50 times between two flushes is embedded and ranked once.

Lists owed are served within a time budget per flush, in two lanes (:func:`refresh_order`):

* **fresh**: the most recently touched users first. Under overload this keeps the delay of what is refreshed
  short instead of making everyone wait behind the whole backlog (oldest-first serves every user late once the
  backlog grows).
* **bounded staleness**: users whose oldest unanswered change is ``refresh_max_staleness_ms`` old or more go
  first, oldest first, with at most ``refresh_stale_share`` of the budget (and whatever the fresh lane leaves).
  Load beyond the budget is shed to this lane, never dropped: the rows are durable, one per user, so the backlog
  is at most the partition's users and the oldest is always next.

A flush after an interval without input uses ``refresh_idle_budget_ms``: when the load drops, the backlog drains.

Embeddings: a new user is embedded before any list (its first list needs ANN candidates); a known user's
re-embedding never precedes its list (the list uses the index as it stands). Between flushes, while lists are
owed, re-embeddings get ``reembed_share`` of the lists' time (:meth:`Refresher.embed_alongside_lists`), else all
the time when no list is owed; a flush that finds the input behind gives them ``embed_budget_ms``.

The lists' budget follows the input (:class:`ListBudget`): while the input keeps up (at most
``refresh_keeping_up_backlog`` messages not applied at a flush), it grows by half per flush up to
``refresh_budget_max_ms``, so the time the input does not need goes to lists; above that it halves back toward
``refresh_budget_ms``.
A flush that finds more than ``refresh_catch_up_backlog`` input messages not applied yet ranks one list and
re-embeds one batch only: a list ranked on state seconds behind its input is stale when published, every
event waiting in Kafka is late whatever the refresh order, and the lists owed stay owed (the lanes serve them
once the input has caught up).
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Hashable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from pymk.events import Impression, Recommendations
from pymk.index.embedder import Embedder, salt_for_version
from pymk.index.records import EmbeddingRecord
from pymk.index.tower_index import TowerSpaceIndex
from pymk.ranking.candidates import CandidateConfig, default_filters
from pymk.ranking.features import FEATURE_INDEX, FeatureBuilder
from pymk.ranking.impressions import shown_impressions, unshown_impressions
from pymk.ranking.incremental import ANN_SPARES, IncrementalLists, ListCacheConfig
from pymk.ranking.recommend import (
    ScoredCandidates,
    rank_scored,
    ranking_order,
    sample_unshown,
    score_candidates,
)
from pymk.ranking.source import SourceNotReady
from pymk.ranking.two_tower import blend_scores
from pymk.settings import Settings
from pymk.streams.ann_shards import Gathered, ShardedAnn
from pymk.streams.global_index import GlobalIndex, ann_config
from pymk.streams.models import Models
from pymk.streams.ranking_source import (
    ActivityOf,
    AnnSearch,
    DegreeOf,
    MostActiveOf,
    PartitionGraphView,
    ProfileOf,
    WorkerNodeFeatures,
    WorkerRankingSource,
)
from pymk.streams.remote_facts import RemoteFacts
from pymk.streams.state import PartitionState
from pymk.streams.user_facts import UserFacts

log = logging.getLogger(__name__)


@dataclass
class RefreshStats:
    embedded: int = 0
    embed_seconds: float = 0.0
    embed_cpu_seconds: float = 0.0  # the same in this thread's CPU time (wall time also counts the machine's load)
    refreshed: int = 0
    refreshed_stale: int = 0  # of which by the bounded-staleness lane
    lists_between_flushes: int = 0  # of which ranked between flushes (WorkerState.refresh_now)
    refresh_seconds: float = 0.0
    refresh_cpu_seconds: float = 0.0  # the same in this thread's CPU time
    deferred: int = 0  # refreshes left for a later flush by the time budget (summed over flushes)
    # lists left for the next slice because their gathered ANN answer no longer fit (SourceNotReady; sharded ANN)
    not_ready: int = 0
    # PYMK_GLOBALS_MODE=reachable: lists and embeddings not published because they read a remote user whose facts
    # were not here yet (asked of the owners before the next slice; streams/remote_facts.py)
    lists_waiting_for_facts: int = 0
    embeddings_waiting_for_facts: int = 0
    # sharded ANN: the seconds of the gathers awaited with the state's lock held (the flush's; input waits
    # meanwhile); the rest of ann_shards.gather_seconds was awaited without it (between flushes)
    ann_gather_seconds_locked: float = 0.0
    backlog: int = 0  # lists owed after the last flush
    oldest_owed_ms: int = 0  # age of the oldest unanswered change after the last flush (wall ms)
    input_backlog: int = 0  # input messages not applied yet, at the last flush
    catch_up_flushes: int = 0  # flushes that left their time to the input (backlog past the limit)
    list_budget_ms: int = 0  # the last flush's budget for lists (ListBudget)
    embed_deferred: int = 0  # re-embeddings due but left for a later flush by the budget, after the last flush
    oldest_embed_due_ms: int = 0  # how long the longest-due of them has been due
    # event (wall) time → publication delay of the last lists, for /metrics
    last_delays_ms: list[int] = field(default_factory=list)
    # where ranking time goes, summed over lists, in seconds: Stage 1, features, predict, order, reasons (with
    # the explanation), and the impressions (shown and the unshown sample)
    rank_seconds_by_step: dict[str, float] = field(default_factory=dict)


def candidate_config(settings: Settings) -> CandidateConfig:
    return CandidateConfig(graph_k=settings.candidates_graph_k, ann_k=settings.candidates_ann_k,
                           popular_k=settings.candidates_popular_k, max_candidates=settings.candidates_max,
                           dismissal_expiry_ms=settings.dismissal_expiry_ms or None)


MAX_EMBED_CREDIT_S = 0.05  # the most re-embedding time the lists' share can save up (embed_alongside_lists)
EMBED_CHUNK = 16  # re-embeddings per embedder call between two looks at the clock (and at least per flush)
# users per embedder call when the held remote users are bounded: their sampled nodes (~110 each at 10 per hop)
# must fit the bound together (Refresher._embed)
BOUNDED_EMBED_BATCH = 4
_MIX = 0x9E3779B97F4A7C15  # Fibonacci hashing: a tie order that changes from flush to flush


def refresh_lanes(first: np.ndarray, last: np.ndarray, users: np.ndarray, now_ms: int,
                  max_staleness_ms: int) -> tuple[np.ndarray, np.ndarray]:
    """The two lanes of owed users given as int64 arrays (first touched, last touched, user), as positions into
    them: (stale, oldest first touch first, ties by user; the others, newest last touch first). Ties among the
    fresh (users touched in the same flush) go to the one waiting longer, then to an order that rotates with
    ``now_ms`` (a multiplicative hash of user xor now, modulo 2^64), so no user id always loses them."""
    stale = np.flatnonzero(first <= now_ms - max_staleness_ms)
    fresh = np.flatnonzero(first > now_ms - max_staleness_ms)
    stale = stale[np.lexsort((users[stale], first[stale]))]
    with np.errstate(over="ignore"):  # the hash wraps modulo 2^64 by design
        mixed = (users[fresh].view(np.uint64) ^ np.uint64(now_ms & 0xFFFFFFFFFFFFFFFF)) * np.uint64(_MIX)
    fresh = fresh[np.lexsort((users[fresh], mixed, first[fresh], -last[fresh]))]
    return stale, fresh


def refresh_order(owed: Iterable[tuple[int, int, int]], now_ms: int,
                  max_staleness_ms: int) -> tuple[list[int], list[int]]:
    """:func:`refresh_lanes` of (first touched, last touched, user) entries, as user lists."""
    table = np.array(list(owed), dtype=np.int64).reshape(-1, 3)
    users = table[:, 2]
    stale, fresh = refresh_lanes(table[:, 0], table[:, 1], users, now_ms, max_staleness_ms)
    return users[stale].tolist(), users[fresh].tolist()


class ListBudget:
    """The seconds a flush may spend on lists, adapted to the input backlog seen at each flush (module doc).
    Multiplicative both ways: a step up is +50 %, a step down halves, so a load change is followed in a few
    flushes; never below ``refresh_budget_ms`` nor above ``refresh_budget_max_ms``."""

    def __init__(self, settings: Settings) -> None:
        self.low_s = settings.refresh_budget_ms / 1000.0
        self.high_s = max(self.low_s, settings.refresh_budget_max_ms / 1000.0)
        self.keeping_up = settings.refresh_keeping_up_backlog
        self.seconds = self.low_s

    def observe(self, backlog: int) -> float:
        """The budget for a flush that found ``backlog`` input messages not applied yet."""
        if backlog <= self.keeping_up:
            self.seconds = min(self.high_s, self.seconds * 1.5)
        else:
            self.seconds = max(self.low_s, self.seconds / 2)
        return self.seconds


class DelayObserver(Protocol):
    def observe(self, amount: float) -> None: ...


class _Unobserved:
    def observe(self, amount: float) -> None:
        pass


class Refresher:
    # event received → list ranked, in seconds: the worker's pymk_list_refresh_seconds histogram (streams/metrics.py)
    delays: DelayObserver = _Unobserved()

    # (stage, exception, partition state, user): one user's embedding or list failed; the worker dead-letters it
    # (streams/errors.py) and the refresher skips the user. None: the failure propagates (pure tests).
    on_user_error: Callable[[str, Exception, PartitionState, int], None] | None = None

    lists: IncrementalLists | None = None  # the kept lists (set in __init__ unless PYMK_LIST_CACHE_BYTES=0)

    _embed_credit_s = 0.0  # re-embedding time earned by lists while lists are owed (embed_alongside_lists)

    # PYMK_ANN_MODE=sharded: Stage 1's ANN gathered from every worker's shard (streams/ann_shards.py); set by the app
    shards: ShardedAnn | None = None
    # PYMK_GLOBALS_MODE=reachable: remote users' facts fetched from their owners (streams/remote_facts.py); set by
    # the app
    remote_facts: RemoteFacts | None = None

    def __init__(self, settings: Settings, index: GlobalIndex, models: Models, degree_of: DegreeOf,
                 profile_of: ProfileOf, activity_of: ActivityOf, most_active_of: MostActiveOf,
                 facts: UserFacts | None = None) -> None:
        self.activity_of = activity_of
        # Stage 2's per-candidate reads (streams/user_facts.py); its owner invalidates remote users, collect()
        # the local ones
        self.facts = facts
        if facts is not None:  # the candidates' embedding stamps (ChangeStampSource, streams/user_facts.py)
            index.listeners.append(facts.embeddings_changed)
        self._partitions: dict[int, PartitionState] = {}
        self._embed_spent_s = 0.0  # the last embed_due's time (an idle flush's budget is shared)
        self.most_active_of = most_active_of
        # Stage 1's ANN in the two-tower space (PYMK_ANN_SPACE=two-tower): candidate-tower vectors follow the index
        self.tower_index: TowerSpaceIndex | None = None
        if settings.ann_space == "two-tower":
            self.tower_index = TowerSpaceIndex(ann_config(settings))
            index.listeners.append(self.tower_index.mark)
        self.settings = settings
        self.index = index
        self.models = models
        self.degree_of = degree_of
        self.profile_of = profile_of
        self.candidates = candidate_config(settings)
        self.stats = RefreshStats()
        self.list_budget = ListBudget(settings)  # its seconds: this flush's (set by observe_input_backlog)
        self.features = FeatureBuilder()  # one per worker: its profile cache lives across lists
        # each ranked user's candidates and matrix, updated in place by its next change (ranking/incremental.py)
        self.lists: IncrementalLists | None = (
            IncrementalLists(ListCacheConfig(max_bytes=settings.list_cache_bytes,
                                             max_age_ms=settings.list_cache_max_age_ms,
                                             max_updates=settings.list_cache_max_updates,
                                             max_changed_share=settings.list_cache_max_changed_share,
                                             shadow_fraction=settings.shadow_fraction))
            if settings.list_cache_bytes > 0 else None)
        self._embedders: dict[int, tuple[str, Embedder]] = {}  # partition → (model version, embedder)
        # one LRU of profile encodings for all of them (the profiles are the worker's, whatever the partition)
        self._node_feature_cache: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        # new users whose embedding read a remote user not held yet: their lists wait with it (_embed)
        self._waiting_for_facts: set[int] = set()

    def embedder(self, state: PartitionState) -> Embedder:
        """One embedder per partition (its graph view), kept for its feature cache; new when the model changes."""
        held = self._embedders.get(state.partition)
        if held is None or held[0] != self.models.embedding_model or held[1].graph.graph is not state.graph:
            features = WorkerNodeFeatures(self.degree_of, self.profile_of, self.facts)
            embedder = self.models.embedder(PartitionGraphView(state), features, cache=self._node_feature_cache)
            held = self._embedders[state.partition] = (self.models.embedding_model, embedder)
        return held[1]

    # ---- 1. who owes what --------------------------------------------------------------------------------------
    def collect(self, state: PartitionState, now_ms: int) -> None:
        """Turn the state changes since the last collect into pending work (durable at the next flush)."""
        own, two_hop = state.graph.take_changed_users()
        behaviour = state.behaviour.take_changed_users()
        profiles = state.profiles.take_changed_users()
        if self.facts is not None:
            self.facts.invalidate(own | profiles)  # a local user's degree, activity, profile: its own rows
        if self.lists is not None:
            # own and 2-hop changes alike: the next update re-reads the 2-hop maps (a neighbour's new edge moves
            # the AA/RA weights and the 2-hop set); views either way: re-read (co-engagements always are)
            self.lists.mark_graph_changed(own | two_hop)
            self.lists.mark_views_changed(behaviour)
            self.lists.invalidate(state.forced_refresh | state.forced_reembed, "forced")
        structural = own | profiles  # what a GraphSAGE embedding reads: the neighbourhood and the profile
        refresh = own | behaviour | profiles
        if self.settings.refresh_scope == "two-hop":
            refresh |= two_hop
        interval = self.settings.reembed_min_interval_ms
        for user in structural:
            record = state.embeddings.get(user)
            # a new (or deleted) user now; a known one once its last embedding is old enough (debounce)
            due = now_ms if record is None or not record.vector.size else max(now_ms, record.ts + interval)
            state.work.touch(user, now_ms, due, user in refresh)
        for user in refresh - structural:
            state.work.touch(user, now_ms, None, True)
        for user in state.forced_reembed:
            state.work.touch(user, now_ms, now_ms, user in state.forced_refresh)
        for user in state.forced_refresh - state.forced_reembed:
            state.work.touch(user, now_ms, None, True)
        state.forced_refresh.clear()
        state.forced_reembed.clear()

    def _observe_partitions(self, states: Sequence[PartitionState]) -> None:
        """Drop what depends on which partitions are local when they change (before any read of this pass)."""
        # by state object too: a partition closed and opened again between two passes was changed elsewhere
        partitions = {state.partition: state for state in states}
        if partitions.keys() != self._partitions.keys() or any(
                held is not partitions[p] for p, held in self._partitions.items()):
            if self.facts is not None:
                self.facts.clear()  # a user now local was read from user-globals, or the other way round
            if self.lists is not None:
                self.lists.clear()  # a partition that comes back was changed elsewhere meanwhile
            self._waiting_for_facts.clear()  # a waiting user's partition may have gone: due again where it is
        self._partitions = partitions

    # ---- 2. embeddings ---------------------------------------------------------------------------------------------
    def observe_input_backlog(self, backlog: int) -> bool:
        """Set this flush's lists budget from the input backlog (ListBudget); whether the input is so far behind
        that this flush should leave the time to it (see the module doc)."""
        behind = backlog > self.settings.refresh_catch_up_backlog
        self.stats.list_budget_ms = round(self.list_budget.observe(backlog) * 1000)
        self.stats.input_backlog = backlog
        self.stats.catch_up_flushes += behind
        return behind

    def embed_due(self, states: Iterable[PartitionState], now_ms: int, budget_s: float | None = None,
                  idle: bool = False, catching_up: bool = False, new_only: bool = False,
                  chunk: int = EMBED_CHUNK) -> list[EmbeddingRecord]:
        """Embed the users due: every new user (searchable at once, whatever the budget), then re-embeddings,
        the longest due first, in chunks while ``budget_s`` (``PYMK_EMBED_BUDGET_MS``; after an interval without
        input, half the idle budget; none while catching up) lasts, at least one chunk per flush; the rest stay
        due (durable rows). ``new_only``: the new users only (before ranking between flushes: a new user's first
        list has its ANN candidates). ``chunk``: re-embeddings per embedder call (a slice between flushes takes
        a smaller one: at least one chunk is embedded, and the event loop waits for it)."""
        started, cpu_started = time.perf_counter(), time.thread_time()
        if budget_s is None:
            budget_s = (0 if catching_up else
                        max(self.settings.embed_budget_ms, self.settings.refresh_idle_budget_ms // 2) if idle
                        else self.settings.embed_budget_ms) / 1000.0
        states = list(states)
        self._observe_partitions(states)  # the embedder reads the fact slots too
        salt = salt_for_version(self.models.embedding_model)
        out: list[EmbeddingRecord] = []
        again: list[tuple[int, int, PartitionState]] = []  # (due since, user, state) of known users
        for state in states:
            due = state.work.embeddings_due(now_ms)
            if new_only:  # the known users' re-embeddings (and deletions) wait for a pass that does them
                due = [u for u in due if state.embeddings.get(u) is None]
            if not due:
                continue
            users = [u for u in due if state.graph.degree(u) > 0 or state.profiles.profile(u) is not None]
            # Nothing to embed from (a user that only viewed or dismissed, or lost every connection and has no
            # profile). One that had a vector is deleted from every index: otherwise whether it stays searchable,
            # and under which stale vector, would depend on whether a flush happened to embed it in between.
            for u in sorted(set(due) - set(users)):
                state.work.embedded(u)
                self._waiting_for_facts.discard(u)  # nothing to embed from any more: its list need not wait
                previous = state.embeddings.get(u)
                if (previous is not None and previous.vector.size) or (previous is None and u in self.index):
                    deletion = EmbeddingRecord(u, self._next_version(state, u), now_ms, self.models.embedding_model,
                                               np.empty(0, dtype=np.float32))
                    state.embeddings.put(deletion)
                    self.index.apply(deletion)
                    out.append(deletion)
            new = [u for u in users if state.embeddings.get(u) is None]
            again.extend((state.work.rows[u][0], u, state) for u in users if state.embeddings.get(u) is not None)
            if new:
                out.extend(self._embed_guarded(state, new, now_ms, salt))
        if new_only:
            self.stats.embedded += len(out)
            self.stats.embed_seconds += time.perf_counter() - started
            self.stats.embed_cpu_seconds += time.thread_time() - cpu_started
            return out
        again.sort(key=lambda item: (item[0], item[1]))
        done = 0
        while done < len(again) and (done == 0 or time.perf_counter() - started <= budget_s):
            users_now = again[done : done + chunk]
            for state in {id(state): state for _, _, state in users_now}.values():
                out.extend(self._embed_guarded(state, [u for _, u, s in users_now if s is state], now_ms, salt))
            done += len(users_now)
        self.stats.embed_deferred = len(again) - done
        self.stats.oldest_embed_due_ms = now_ms - again[done][0] if done < len(again) else 0
        self.stats.embedded += len(out)
        self._embed_spent_s = time.perf_counter() - started
        self.stats.embed_seconds += self._embed_spent_s
        self.stats.embed_cpu_seconds += time.thread_time() - cpu_started
        return out

    def embed_alongside_lists(self, states: Sequence[PartitionState], now_ms: int) -> list[EmbeddingRecord]:
        """Re-embeddings while lists are owed (between flushes, after a slice's lists): up to
        ``reembed_share`` of the time spent on lists (a credit that the lists' time fills and the re-embeddings
        spend; at least one chunk once it is positive, so it may go below zero). Without it a known user's
        re-embedding would wait until no list is owed, which under overload is never, and the index would
        drift from the graph; with it, it never delays a list by more than a chunk (~6 ms for 16 users)."""
        if self._embed_credit_s <= 0 or not any(state.work.has_embeddings_due(now_ms) for state in states):
            return []
        started = time.perf_counter()
        out = self.embed_due(states, now_ms, budget_s=self._embed_credit_s)
        self._embed_credit_s -= time.perf_counter() - started
        return out

    def _embed_guarded(self, state: PartitionState, users: list[int], now_ms: int,
                       salt: int) -> list[EmbeddingRecord]:
        """:meth:`_embed`, and when the batch fails, each user alone: a user whose embedding fails is reported
        (``on_user_error``) and marked embedded (it is embedded again at its next change); the others are not lost."""
        if self.on_user_error is None:
            return self._embed(state, users, now_ms, salt)
        try:
            return self._embed(state, users, now_ms, salt)
        except Exception:  # noqa: BLE001 - found out below, user by user
            if len(users) == 1:
                return self._embed_one_guarded(state, users[0], now_ms, salt)
        out: list[EmbeddingRecord] = []
        for user in users:
            out.extend(self._embed_one_guarded(state, user, now_ms, salt))
        return out

    def _embed_one_guarded(self, state: PartitionState, user: int, now_ms: int, salt: int) -> list[EmbeddingRecord]:
        assert self.on_user_error is not None
        try:
            return self._embed(state, [user], now_ms, salt)
        except Exception as exc:  # noqa: BLE001 - one user's failure must not stop the worker (streams/errors.py)
            self.on_user_error("embedding", exc, state, user)
            state.work.embedded(user)
            return []

    def _next_version(self, state: PartitionState, user: int) -> int:
        """One more than any version of the user's embedding seen here: the partition's row, or the index's. A
        partition taken over without its state (from a killed worker on another machine) has no row, and its
        new records must still beat what the previous owner published: every index keeps the highest version,
        so a new record numbered from 1 would be ignored, and the old vector served, until the count caught up
        (seen in the three-worker test)."""
        previous = state.embeddings.get(user)
        return max(previous.version if previous is not None else 0, self.index.versions.get(user, 0)) + 1

    def _facts_misses(self) -> int:
        """Reads of remote users not held yet (reachable globals): one that grows across a list or an embedding
        means it read an unknown in place of a fact, and it is not published."""
        return self.remote_facts.misses if self.remote_facts is not None else 0

    def _facts_bounded(self) -> bool:
        """Reachable globals with a bound on the held users (PYMK_GLOBALS_HELD_MAX_USERS)."""
        return self.remote_facts is not None and self.remote_facts.globals.held_max_users > 0

    async def fetch_facts(self) -> None:
        """Reachable globals: ask the owners for the users the last lists and embeddings missed (module doc of
        streams/remote_facts.py); awaited without the state's lock."""
        if self.remote_facts is not None and self.remote_facts.globals.wanted:
            await self.remote_facts.fetch()

    def _embed(self, state: PartitionState, users: list[int], now_ms: int, salt: int) -> list[EmbeddingRecord]:
        # one salt per model version: sampling is a function of (salt, user, neighbours), so the same state
        # gives the same vector, also when a crash makes the worker redo this flush
        waiting = [user for user in users if user in self._waiting_for_facts]
        if waiting and len(waiting) < len(users):
            # the users that waited first, alone: their nodes were asked for, so a newcomer's miss cannot hold
            # them back again (a batch that always holds a newcomer would never be published)
            others = [user for user in users if user not in self._waiting_for_facts]
            return self._embed(state, waiting, now_ms, salt) + self._embed(state, others, now_ms, salt)
        if len(users) > BOUNDED_EMBED_BATCH and self._facts_bounded():
            # under a bound on the held users (refresh_due's comment) a batch whose sampled nodes outnumber it would
            # wait for ever: small batches, and the first that waits stops the pass (the rest stay due)
            out: list[EmbeddingRecord] = []
            for start in range(0, len(users), BOUNDED_EMBED_BATCH):
                misses = self._facts_misses()
                out += self._embed(state, users[start:start + BOUNDED_EMBED_BATCH], now_ms, salt)
                if self._facts_misses() != misses:
                    break
            return out
        misses = self._facts_misses()
        vectors = self.embedder(state).embed(users, salt)
        if self._facts_misses() != misses:  # a sampled node's facts were not here: due still, after the fetch
            self.stats.embeddings_waiting_for_facts += len(users)
            self._waiting_for_facts.update(users)
            return []
        self._waiting_for_facts.difference_update(users)
        records = []
        for user, vector in zip(users, vectors, strict=True):
            records.append(EmbeddingRecord(user, self._next_version(state, user), now_ms,
                                           self.models.embedding_model, np.asarray(vector, dtype=np.float32)))
            state.work.embedded(user)
        state.embeddings.put_many(records)
        self.index.apply_many(records)
        return records

    # ---- 3. lists -----------------------------------------------------------------------------------------------
    async def prefetch_ann(self, states: Sequence[PartitionState], now_ms: int) -> None:
        """Sharded ANN: :meth:`ann_wanted`, :meth:`gather_ann` and :meth:`install_ann` in one (the flush's way, under
        the state's lock; between flushes ``WorkerState.refresh_now`` releases the lock for the gather)."""
        wanted = self.ann_wanted(states, now_ms)
        if wanted:
            self.install_ann(await self.gather_ann(wanted, locked=True))

    def ann_wanted(self, states: Sequence[PartitionState], now_ms: int) -> list[tuple[int, frozenset[int]]]:
        """Sharded ANN: the next ``ann_shard_batch`` owed users (in the lanes' order) with Stage 1's exclusions,
        whose answers :meth:`refresh_due` will need; [] without sharding or owed lists. :meth:`refresh_due` ranks
        only users whose answers were gathered (the others wait for the next slice)."""
        if self.shards is None or self.tower_index is not None:
            return []
        states = list(states)
        held = [state.work.owed_arrays() for state in states]
        if not held or not sum(len(users) for _, _, users in held):
            return []
        users = np.concatenate([users for _, _, users in held])
        state_at = np.repeat(np.arange(len(states)), [len(users) for _, _, users in held])
        stale, fresh = refresh_lanes(np.concatenate([first for first, _, _ in held]),
                                     np.concatenate([last for _, last, _ in held]), users, now_ms,
                                     self.settings.refresh_max_staleness_ms)
        filters = default_filters(self.candidates)
        wanted = []
        # the order refresh_due serves them in: the stale lane's share, the fresh lane, then the rest of the stale
        batch = self.settings.ann_shard_batch
        share = math.ceil(batch * self.settings.refresh_stale_share)
        for position in np.concatenate([stale[:share], fresh, stale[share:]])[:batch].tolist():
            user, state = int(users[position]), states[state_at[position]]
            source = WorkerRankingSource(state, self.index, self.degree_of, self.profile_of, self.activity_of,
                                         self.most_active_of, facts=self.facts)
            as_of = state.event_time_ms or now_ms
            wanted.append((user, frozenset().union(*(f.excluded(user, source, as_of) for f in filters))))
        return wanted

    async def gather_ann(self, wanted: Sequence[tuple[int, frozenset[int]]], locked: bool = False) -> Gathered:
        """Every shard's answer for ``wanted`` (for ann_k + ANN_SPARES: what the kept lists may ask), merged. Only
        awaits after reading the query vectors: it may run without the state's lock, since each answer carries the
        vector and exclusions it was asked with and ranking uses it only while they still hold. ``locked``: whether
        the caller holds the state's lock (counted apart in the stats)."""
        assert self.shards is not None
        started = time.perf_counter()
        try:
            gathered = await self.shards.gather(wanted, self.candidates.ann_k + ANN_SPARES)
            if self.remote_facts is not None:  # the hits' facts, asked now rather than missed by their lists
                self.remote_facts.want(user for held in gathered.values() for user, _ in held.hits)
                await self.remote_facts.fetch()
            return gathered
        finally:
            if locked:
                self.stats.ann_gather_seconds_locked += time.perf_counter() - started

    def install_ann(self, gathered: Gathered) -> None:
        """The answers the next :meth:`refresh_due` ranks from (it clears them when done)."""
        assert self.shards is not None
        self.shards.ready = gathered

    def refresh_due(self, states: Iterable[PartitionState], now_ms: int, budget_s: float | None = None,
                    idle: bool = False, catching_up: bool = False) -> list[tuple[Recommendations, list[Impression]]]:
        """The lists owed, as (list, its impressions), by lane (see the module doc) within the time budget.
        ``idle``: no input since the last flush, so the larger idle budget applies; ``catching_up``: the input
        is behind, one list only."""
        started, cpu_started = time.perf_counter(), time.thread_time()
        settings = self.settings
        states = list(states)
        self._observe_partitions(states)
        # every owed user as arrays (a position each; its state by index): the lanes are ordered with numpy, since
        # this runs once per slice between flushes and under overload every user of the partitions is owed
        held = [state.work.owed_arrays() for state in states]
        first_at = np.concatenate([first for first, _, _ in held]) if held else np.empty(0, np.int64)
        last_at = np.concatenate([last for _, last, _ in held]) if held else np.empty(0, np.int64)
        user_at = np.concatenate([users for _, _, users in held]) if held else np.empty(0, np.int64)
        state_index_at = np.repeat(np.arange(len(states)), [len(users) for _, _, users in held])
        stale, fresh = refresh_lanes(first_at, last_at, user_at, now_ms, settings.refresh_max_staleness_ms)
        if budget_s is None:
            budget_s = 0.0 if catching_up else self.list_budget.seconds
            if idle:  # the idle budget is for the whole flush: what this flush's embeddings left of it
                budget_s = max(budget_s, settings.refresh_idle_budget_ms / 1000.0 - self._embed_spent_s)
        out: list[tuple[Recommendations, list[Impression]]] = []
        done = np.zeros(len(user_at), bool)  # by position
        sharded = self.shards is not None and self.tower_index is None
        # reachable globals under a bound: the slice stops at the first list that waits for facts. Its users are
        # asked and held at the next fetch; lists ranked after it would ask more, and an answer past the bound
        # evicts the users answered longest ago, which the first list may need again: a slice whose lists read
        # more users than the bound would then wait for ever (measured: 3 workers, a bound of 1,500 users, 4–34
        # lists in 5 minutes). So one list's users are asked at a time; while they fit the bound it comes out
        # within a few fetches (an answer may still evict some of its older ones: the bound's order is by answer).
        bounded = self._facts_bounded()
        stopped = False

        def serve(positions: np.ndarray, until_s: float) -> None:
            nonlocal stopped
            for position in positions.tolist():
                if stopped:
                    return
                if done[position]:
                    continue
                if out and time.perf_counter() - started > until_s:  # at least one list per flush
                    return
                user, state, first = int(user_at[position]), states[state_index_at[position]], int(first_at[position])
                if sharded and user not in self.shards.ready:  # type: ignore[union-attr]
                    continue  # its ANN answer was not gathered: the next slice's prefetch asks for it
                if user in self._waiting_for_facts and state.embeddings.get(user) is None:
                    continue  # a new user's embedding waits for facts (_embed): so does the list that reads it
                done[position] = True
                misses = self._facts_misses()
                try:
                    ranked = self.rank(state, user, now_ms)
                except SourceNotReady:  # its ANN answer no longer fits its vector or exclusions: the next slice
                    done[position] = False
                    self.stats.not_ready += 1
                    continue
                except Exception as exc:
                    if self.on_user_error is None:
                        raise
                    # skipped: owed again at the user's next change (streams/errors.py)
                    self.on_user_error("ranking", exc, state, user)
                    state.work.refreshed(user)
                    continue
                if self._facts_misses() != misses:  # read a remote user not held yet: after the next fetch
                    done[position] = False
                    self.stats.lists_waiting_for_facts += 1
                    if self.lists is not None:  # its kept rows hold the unknowns: a full Stage 1 next time
                        self.lists.invalidate((user,), "facts")
                    stopped = bounded
                    continue
                out.append(ranked)
                state.work.refreshed(user)
                state.published.put(out[-1][0])
                self.stats.last_delays_ms.append(now_ms - first)
                self.delays.observe((now_ms - first) / 1000.0)

        serve(stale, budget_s * settings.refresh_stale_share)
        serve(fresh, budget_s)
        serve(stale, budget_s)  # what the fresh lane left
        if self.shards is not None:
            self.shards.clear()  # a later slice asks again: the shards move meanwhile
        left = first_at[~done]
        self.stats.last_delays_ms = self.stats.last_delays_ms[-1000:]
        self.stats.refreshed += len(out)
        self.stats.refreshed_stale += int(done[stale].sum())
        self.stats.deferred += len(left)
        self.stats.backlog = len(left)
        self.stats.oldest_owed_ms = now_ms - int(left.min()) if len(left) else 0
        spent = time.perf_counter() - started
        self.stats.refresh_seconds += spent
        self.stats.refresh_cpu_seconds += time.thread_time() - cpu_started
        # capped: a long run of lists with nothing to re-embed does not buy one long pause later
        self._embed_credit_s = min(self._embed_credit_s + spent * settings.reembed_share, MAX_EMBED_CREDIT_S)
        return out

    def rank(self, state: PartitionState, user: int, now_ms: int) -> tuple[Recommendations, list[Impression]]:
        source = WorkerRankingSource(state, self.index, self.degree_of, self.profile_of, self.activity_of,
                                     self.most_active_of, facts=self.facts)
        if self.tower_index is not None:
            source.ann = self._tower_space_search(source)
        elif self.shards is not None:
            source.ann = self.shards.ann
        # ranked as of the partition's event time (a replay ranks as live traffic did); published now
        as_of = state.event_time_ms or now_ms
        scorer = self.models.scorer
        k = self.settings.recommendations_k
        reranker = self.models.reranker
        # a ranker that dropped the structure columns never reads them: the matrix goes without, the logged rows
        # get them (_with_structure), so the next ranker trained on this traffic can still choose them
        self.features.structure = getattr(scorer, "reads_structure_columns", True)
        if self.lists is not None:  # incremental when the kept list allows it, else the full path (and kept)
            # the top k's features are exact; the rest only where they are logged (_unshown_sample) or re-ranked
            scored = self.lists.score(user, source, scorer, self.candidates, as_of, k, self.features,
                                      exact_features=reranker is not None, now_ms=now_ms)
        else:
            scored = score_candidates(user, source, scorer, self.candidates, as_of, k=k, builder=self.features)
        unstructured = scored.features
        scored = self._with_structure(user, scored, scored.top, source)
        # the copy the shown rows' structure columns went into, which the unshown sample's may share
        own_features = scored.features if scored.features is not unstructured else None
        if self.settings.ranker_kind != "xgboost" and len(scored.candidates):
            scored = self._two_tower_scores(user, scored, source, k)
        rerank_scores: dict[int, float] = {}
        if reranker is not None and len(scored.candidates):
            from pymk.ranking.cross_attention import rerank_scored

            scored, rerank_scores = rerank_scored(user, scored, source, reranker, k)
        ranked = rank_scored(user, scored, source, scorer, as_of, builder=self.features)
        if reranker is not None:
            from pymk.ranking.cross_attention import mark_reranked

            index_of = {int(scored.candidates.ids[i]): int(i) for i in scored.top.tolist()}
            ranked = mark_reranked(ranked, rerank_scores, index_of, reranker.version)
        if self.settings.ranker_kind != "xgboost" or reranker is not None:
            ranked = replace(ranked, model_version=self.models.ranker_version)
        logged = time.perf_counter()
        impressions = shown_impressions(ranked, now_ms, as_of)
        impressions.extend(self._unshown_sample(user, scored, ranked.model_version, as_of, now_ms, source,
                                                own_features=own_features))
        by_step = self.stats.rank_seconds_by_step
        for step, ms in ranked.timings.items():
            if step != "total":
                by_step[step] = by_step.get(step, 0.0) + ms / 1000.0
        by_step["impressions"] = by_step.get("impressions", 0.0) + time.perf_counter() - logged
        return replace(ranked.to_recommendations(), generated_at=now_ms), impressions

    def describe_lists(self) -> dict[str, object] | None:
        """The kept lists and the shadow check, for /stats."""
        if self.lists is None:
            return None
        return {"cache": self.lists.describe(), "shadow": self.lists.describe_shadow()}

    def _tower_space_search(self, source: WorkerRankingSource) -> AnnSearch:
        """Stage 1's ANN over the candidate-tower index, brought up to date first (a no-op when nothing changed)."""
        tower, tower_index = self.models.two_tower, self.tower_index
        assert tower is not None and tower_index is not None
        tower_index.sync(tower, source, self.index.users)

        def search(user: int, k: int, exclude: Collection[int]) -> Sequence[tuple[int, float]]:
            return tower_index.neighbours(tower, user, source, k, exclude)

        return search

    def _two_tower_scores(self, user: int, scored: ScoredCandidates, source: WorkerRankingSource,
                          k: int) -> ScoredCandidates:
        """Stage 2 by the two-tower model (or the blend); reasons keep the XGBoost explanation of each item."""
        tower = self.models.two_tower.score(user, scored.candidates.ids, source)
        scores = (tower if self.settings.ranker_kind == "two-tower"
                  else blend_scores(scored.scores, tower, self.settings.blend_weight))
        top = ranking_order(scores, scored.features[:, FEATURE_INDEX["candidate_degree_log"]], scored.candidates.ids,
                            k)
        return replace(scored, scores=np.asarray(scores, dtype=np.float64), top=top)

    def _with_structure(self, user: int, scored: ScoredCandidates, rows: np.ndarray,
                        source: WorkerRankingSource, copy: bool = True) -> ScoredCandidates:
        """``scored`` with the structure columns of ``rows`` computed, when the matrix went without them (a copy:
        a kept list's matrix is not written; ``copy=False``: ``scored``'s matrix is this list's own copy already)."""
        if self.features.structure or not len(rows):
            return scored
        index = np.asarray(rows, np.int64)
        features = scored.features.copy() if copy else scored.features
        part = features[index]
        self.features.fill_structure(user, scored.candidates.ids[index], source, part)
        features[index] = part
        return replace(scored, features=features)

    def _unshown_sample(self, user: int, scored: ScoredCandidates, model_version: str, as_of: int,
                        now_ms: int, source: WorkerRankingSource,
                        own_features: np.ndarray | None = None) -> list[Impression]:
        """A sample of the candidates the model scored but did not show (``rank`` 0, weighted by how many they
        stand for; :func:`sample_unshown`), logged like the shown ones: a model retrained only on what its
        predecessor showed learns to re-order that top 20 and nothing about the other candidates it will have
        to rank. Seeded by (user, as-of), so a redone flush logs the same."""
        rng = np.random.default_rng([user & 0x7FFFFFFFFFFFFFFF, as_of])
        sample = sample_unshown(scored.top, scored.scores, self.settings.impressions_unshown_sample,
                                self.settings.impressions_unshown_near_ranks, rng)
        if self.lists is not None and sample:  # a kept list's rows beyond the top k: as of now where logged
            exact = self.lists.exact_features(user, scored, as_of, [index for index, _ in sample])
            if exact.features is not scored.features:  # brought to now in a copy of its own
                own_features = exact.features
            scored = exact
        # into the list's own copy when it has one (the shown rows' structure went there): one copy a list, not two
        scored = self._with_structure(user, scored, np.array([index for index, _ in sample], np.int64), source,
                                      copy=scored.features is not own_features)
        return unshown_impressions(user, scored, sample, model_version, now_ms, as_of)
