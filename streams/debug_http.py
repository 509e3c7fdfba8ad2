"""The read-only debug HTTP API of a worker (faust's web server): health, metrics, stats, memory, and the views
of one user, answered by the worker that owns the user's partition (a request to another worker is forwarded
to the owner once; while a partition has no reachable owner the answer is a retryable 503).

Every view reads; none writes or caches a row for a user no event named (such a user is a 404), so debugging
cannot change what is published. The contract of these pages: docs/contract.md.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import aiohttp
import numpy as np
from yarl import URL

from pymk.events import MAX_USER_ID
from pymk.features.pair import FeatureValue, graph_pair_features
from pymk.features.profile import profile_feature_timestamps, profile_features
from pymk.process_memory import malloc_bytes, pymalloc_bytes, rss_bytes
from pymk.ranking.features import FEATURE_NAMES
from pymk.streams.ann_shards import SHARD_PATH, decode_request, encode_answer, search_shard
from pymk.streams.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from pymk.streams.ranking_source import WorkerRankingSource, pair_feature_row
from pymk.streams.remote_facts import FACTS_PATH, facts_answer
from pymk.streams.remote_facts import decode_request as decode_facts_request
from pymk.streams.remote_facts import encode_answer as encode_facts_answer
from pymk.streams.state import PartitionState

if TYPE_CHECKING:
    from pymk.streams.app import PymkApp

# The 400 answer to a user id outside the contract's: non-negative 64-bit integers.
BAD_USER_ID = "user ids must be non-negative 64-bit integers: ASCII decimal digits, at most 9223372036854775807"
# Debug queries about a user are forwarded to the worker owning the user's partition, marked with this header.
FORWARDED_HEADER = "X-Pymk-Forwarded"
ROUTE_TIMEOUT_S = 10.0
ROUTE_RETRY_AFTER_S = 1
# the columns /features keeps from the graph's own rows for a pair already connected (never ranked)
GRAPH_FEATURES = frozenset({"common_neighbor_count", "adamic_adar_score", "jaccard_sim", "graph_distance_bucket",
                            "query_degree_log", "candidate_degree_log", "resource_allocation_score"})


class DebugViews:
    """The pages of one worker and the views behind them."""

    def __init__(self, worker: PymkApp) -> None:
        self.app = worker.app
        self.settings = worker.settings
        self.state = worker.state
        self.partition_of = worker.partition_of
        self.index = worker.index
        self.shards = worker.debug_shards  # sharded ANN: /neighbours gathers every shard's answer
        self.remote_facts = worker.remote_facts  # reachable globals: the pages fetch what they miss
        self.state_of_user = worker.state_of_user
        self.globals = worker.globals
        self.models = worker.models
        self.refresher = worker.refresher
        self.metrics = worker.metrics
        self.gc_pauses = worker.gc_pauses
        self.progress = worker.progress
        self.degree_value = worker.degree_value
        self.profile_value = worker.profile_value
        self.input_topics = worker.input_topics

    # ---- views ---------------------------------------------------------------------------------------------------
    def degree_of(self, user: int) -> tuple[int, int | None]:
        state = self.state.state_for(self.partition_of(user))
        if state is not None:
            return state.graph.degree_with_ts(user)
        return self.globals.degree(user)

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
            "two_hop_candidates": len(state.graph.common_neighbor_counts(user)),
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

    async def neighbours_view(self, user: int, k: int, with_vector: bool = False) -> dict[str, Any]:
        """ANN neighbours: from this worker's copy of the global index (replicated: every worker holds every user),
        or gathered from every shard and merged, as Stage 1 asks them (sharded; ``missing_partitions``: those no
        shard answered for, whose users the answer lacks)."""
        body: dict[str, Any] = {"user": user, "k": k, "embedding": self.index.describe(user)}
        if self.shards is None:
            found = self.index.neighbours(user, k)
        else:
            vector = self.index.vector(user)  # the vector store holds every user's, whichever shard indexes it
            if vector is None and self.index.reachable and self.remote_facts is not None:
                # only the users this worker reaches: a remote user's vector asked of its owner first
                self.remote_facts.want([user])
                await self.remote_facts.fetch()
                vector = self.index.vector(user)
            found, missing = [], set()
            if vector is not None:
                answers, missing = await self.shards.search(np.asarray(vector, np.float32)[None, :], k, [{user}])
                found = answers[0]
            body["missing_partitions"] = sorted(missing)
        body["ann_mode"] = self.settings.ann_mode
        body["neighbours"] = [{"user": v, "cosine": float(score)} for v, score in found]
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
        # when each feature last changed (the contract's "ts"), from the rows that hold it
        features = graph_pair_features(state.graph, user, candidate, self.degree_of)
        as_of = state.event_time_ms or int(time.time() * 1000)  # the as-of time lists are ranked at (refresh.py)
        for name, (value, ts) in state.behaviour.pair_features(user, candidate, as_of).items():
            features[name] = FeatureValue(value, ts)
        own_profile = state.profiles.profile(user)
        own_ts = state.profiles.field_timestamps(user)
        other_profile, other_ts = self.profile_of(candidate)
        stamps = profile_feature_timestamps(own_ts, other_ts)
        for name, value in profile_features(own_profile, other_profile).items():
            features[name] = FeatureValue(value, stamps[name])
        # the values: the ranking matrix's row of the pair (one code path with what the ranker sees); a pair
        # already connected is never ranked, and keeps the graph features of the contract (distance 1, its count)
        source = WorkerRankingSource(state, self.index, self.degree_value, self.profile_value, self.globals.activity,
                                     self.globals.most_active)
        connected = candidate in state.graph.neighbours(user)
        for name, value in pair_feature_row(source, user, candidate, as_of).items():
            held = features.get(name)
            if held is None:
                features[name] = FeatureValue(value, None)
            elif not (connected and name in GRAPH_FEATURES):
                # the matrix holds floats; a count or a flag keeps its JSON type (3, not 3.0)
                kind = type(held.value) if isinstance(held.value, bool | int) and value is not None else float
                features[name] = FeatureValue(value if kind is float else kind(value), held.ts)
        return {"user": user, "candidate": candidate, "as_of": as_of,
                # the ranking columns in matrix order, then the contract's features the ranker does not read
                "features": {name: features[name].to_dict()
                             for name in (*FEATURE_NAMES, *(n for n in features if n not in FEATURE_NAMES))},
                "mutual_examples": state.graph.common_neighbors(user, candidate)[:3]}

    def profile_of(self, user: int) -> tuple[Any, dict[str, int]]:
        state = self.state.state_for(self.partition_of(user))
        if state is not None:
            return state.profiles.profile(user), state.profiles.field_timestamps(user)
        return self.globals.profile(user)

    def register_shard_search(self) -> None:
        """``POST /ann/shard`` (streams/ann_shards.py): several query vectors, k and each query's excluded ids →
        each query's top k in this worker's HNSW graph and the partitions it holds (all when replicated)."""
        from faust.web import View

        index, partitions = self.index, self.settings.partitions

        class ShardSearch(View):
            async def post(self, request: Any) -> Any:
                queries, k, excludes = decode_request(await request.read())
                ids, scores = await search_shard(index.index, queries, k, excludes)
                held = index.graph_partitions if index.sharded else range(partitions)
                return self.bytes(encode_answer(ids, scores, held), content_type="application/octet-stream")

        self.app.page(SHARD_PATH)(ShardSearch)

    def register_facts(self) -> None:
        """``POST /facts`` (streams/remote_facts.py): user ids → those of this worker's partitions and their
        ``user-globals`` records as of now (what a worker in ``PYMK_GLOBALS_MODE=reachable`` asks its peers)."""
        from faust.web import View

        state_for, index = self.state_of_user, self.index

        class Facts(View):
            async def post(self, request: Any) -> Any:
                answer = facts_answer(decode_facts_request(await request.read()), state_for, index)
                return self.bytes(encode_facts_answer(answer), content_type="application/octet-stream")

        self.app.page(FACTS_PATH)(Facts)

    def register(self) -> None:
        """Add the pages to the faust app's web server."""
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
                             "input_backlog": self.progress.backlog(),
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
                             "globals": (self.remote_facts.describe() if self.remote_facts is not None
                                         else self.globals.describe_held()),
                             "index": {"users": len(self.index.index), "records_applied": self.index.records_applied,
                                       "caught_up": self.index.caught_up.is_set(), "offsets": self.index.offsets,
                                       "ann_space": self.settings.ann_space, **tower,
                                       # sharded: this worker's partitions in the graph, and every user's vector
                                       "ann_mode": self.settings.ann_mode,
                                       "shard_partitions": (sorted(self.index.shard_partitions)
                                                            if self.index.shard_partitions is not None else None),
                                       "graph_partitions": sorted(self.index.graph_partitions),
                                       "vector_store_users": (len(self.index.store)
                                                              if self.index.store is not None else None),
                                       # sharded with reachable globals: only the shard's and the held users'
                                       # vectors; records of others dropped as read; partitions read again
                                       "vectors": "reachable" if self.index.reachable else "all",
                                       "vector_records_dropped": self.index.records_dropped,
                                       "vector_rewinds": self.index.rewinds},
                             # sharded: the scatter-gathers, their peers' failures and partial answers
                             "ann_shards": (self.refresher.shards.describe() if self.refresher is not None
                                            and self.refresher.shards is not None else None),
                             "refresh": refresh, "models": self.models.describe() if self.models else None,
                             # kept lists (bytes, entries, hits, misses, evictions, full builds by reason) and the
                             # shadow check of incremental lists (checked, equal, equal_share)
                             "lists": self.refresher.describe_lists() if self.refresher is not None else None,
                             "gc": self.gc_pauses.snapshot(),
                             "behind": self.progress.describe()})

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
                           if key in ("bytes", "max_bytes", "entries", "bytes_per_entry", "hits", "misses",
                                      "evictions")}
                          if kept is not None else None)
            answer: dict[str, Any] = {"rss_bytes": rss_bytes(),
                                      "row_cache_bytes": sum(s.cache_budget.estimated_bytes
                                                             for s in self.state.owned.values()),
                                      "rocksdb_memory_bytes": (self.state.rocks_memory.usage_bytes()
                                                               if self.state.rocks_memory is not None else None),
                                      # summed over the databases; memtables are inside rocksdb_memory_bytes too
                                      "rocksdb_properties_bytes": rocksdb_properties,
                                      "ann_index_bytes": self.index.index.memory_bytes(),
                                      # sharded: the vectors the cosine columns read (arrays; every user's, or the
                                      # own and held users' with reachable globals)
                                      "vector_store_bytes": (self.index.store.nbytes()
                                                             if self.index.store is not None else None),
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
                        if self.progress.partition_behind(partition):  # its events may not be re-applied yet
                            return moving(web, partition, "its state is catching up with its input")
                        return web.json({"error": f"user {unknown[0]} is unknown: no event has named it "
                                                  "(in this worker's partitions)", "user": unknown[0]}, status=404)
                    misses = self.globals.misses
                    body = view(*ids)
                    if self.globals.misses != misses and self.remote_facts is not None:
                        # reachable globals: a remote user read was not held: asked of its owner, then read again
                        await self.remote_facts.fetch()
                        body = view(*ids)
                    if body is None:
                        return moving(web, self.partition_of(ids[0]), "not open here")
                    if html:
                        return web.bytes(body.encode(), headers={"Content-Type": "text/html; charset=utf-8"})
                    return web.json(body)

                return await routed(web, request, u, local)

        self.register_shard_search()
        self.register_facts()
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
            return web.json(await self.neighbours_view(user, int(k_text), request.query.get("vector") == "1"))
