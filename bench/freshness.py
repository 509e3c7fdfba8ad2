"""`pymk bench freshness`: how soon after an event the affected users' refreshed lists are out.

A synthetic network (profiles, connections, views, dismissals, engagements) is split in time: its first part is
loaded and fully processed by a fresh worker (so the graph has history), then the rest is produced at a steady
rate through Kafka while a consumer reads the recommendations topic. For each event, the affected users are those
whose list the event must refresh (both users of a connection, viewer and viewed, the dismisser, the engager,
the profile owner); its delay is from the moment the producer sent it to the broker's timestamp of the first
list of each affected user published after that moment (the worker's producer stamps the record when the flush
sends it); an event is refreshed once all its users got such a list.

Two readings, both reported:

* **in the window** (the headline ``delay_ms`` and ``share_of_events_refreshed``): lists published from the first
  send until ``window_grace_s`` after the last one. At the window's end the worker's ``/health`` tells how many
  lists it still owes (``deferred_at_window_end``: the load it shed to the bounded-staleness lane) and the
  consumer lag tells whether it kept up with the input at all.
* **after the drain** (``after_drain``): the same once the worker owes nothing (lag 0, no pending work), with the
  time that took: the deferred lists are published then, nothing is dropped; their delays are in these figures.
"""

from __future__ import annotations

import bisect
import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.request import urlopen

from kafka import KafkaConsumer, TopicPartition

from pymk.events import ConnectionEvent, DismissalEvent, EngagementEvent, InputEvent, ProfileViewEvent, UserEvent
from pymk.processes import start_worker_process, stop_process
from pymk.settings import Settings


def affected_users(event: InputEvent) -> tuple[int, ...]:
    if isinstance(event, ConnectionEvent):
        return (event.src, event.dst)
    if isinstance(event, ProfileViewEvent):
        return (event.viewer, event.viewed)
    if isinstance(event, DismissalEvent):
        return (event.user,)
    if isinstance(event, EngagementEvent):
        return (event.user,)
    assert isinstance(event, UserEvent)
    return (event.user,)


class ListWatcher(threading.Thread):
    """Reads the recommendations topic from its end: user → sorted broker timestamps of their lists."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(daemon=True)
        self.settings = settings
        self.published: dict[int, list[int]] = {}
        self.stop_event = threading.Event()
        self.ready = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        topic = self.settings.topic("recommendations")
        consumer = KafkaConsumer(**self.settings.kafka_client_config(), group_id=None, enable_auto_commit=False,
                                 client_id="pymk-bench-freshness")
        try:
            tps = [TopicPartition(topic, p) for p in range(self.settings.partitions)]
            consumer.assign(tps)
            consumer.seek_to_end(*tps)
            for tp in tps:
                consumer.position(tp)
            self.ready.set()
            while not self.stop_event.is_set():
                for records in consumer.poll(timeout_ms=200).values():
                    with self.lock:
                        for record in records:
                            user = int(record.key)
                            self.published.setdefault(user, []).append(record.timestamp)
        finally:
            consumer.close()

    def snapshot(self) -> dict[int, list[int]]:
        """user → sorted broker timestamps of the lists read so far."""
        with self.lock:
            return {user: sorted(stamps) for user, stamps in self.published.items()}


def first_after(published: dict[int, list[int]], user: int, t_ms: int) -> int | None:
    stamps = published.get(user, [])
    i = bisect.bisect_left(stamps, t_ms)
    return stamps[i] if i < len(stamps) else None


def _page(url: str, path: str) -> dict[str, Any]:
    try:
        with urlopen(url + path, timeout=5) as response:
            return dict(json.loads(response.read()))
    except OSError:
        return {}


def _health(url: str) -> dict[str, Any]:
    return _page(url, "/health")


def _list_costs(refresh: dict[str, Any], flush: dict[str, Any]) -> dict[str, Any]:
    """A worker's lists so far (warm-up included): how many, and the mean milliseconds per list by step; its
    flushes, and the outbox messages sent between them."""
    lists = int(refresh.get("refreshed") or 0)
    steps = refresh.get("rank_seconds_by_step") or {}
    return {"lists": lists, "refresh_seconds": round(float(refresh.get("refresh_seconds") or 0.0), 1),
            "mean_ms_per_list": ({step: round(1000 * seconds / lists, 3) for step, seconds in steps.items()}
                                 if lists else {}),
            "catch_up_flushes": refresh.get("catch_up_flushes"), "list_budget_ms_last": refresh.get("list_budget_ms"),
            "lists_between_flushes": refresh.get("lists_between_flushes"),
            "refresh_cpu_seconds": round(float(refresh.get("refresh_cpu_seconds") or 0.0), 1),
            "embedded": refresh.get("embedded"), "embed_seconds": round(float(refresh.get("embed_seconds") or 0.0), 1),
            "embed_cpu_seconds": round(float(refresh.get("embed_cpu_seconds") or 0.0), 1),
            # re-embeddings due but not done yet, and how long the longest-due has waited (lists go first)
            "embed_deferred": refresh.get("embed_deferred"), "oldest_embed_due_ms": refresh.get("oldest_embed_due_ms"),
            "flushes": flush.get("flushes"), "flush_seconds": round(float(flush.get("seconds") or 0.0), 1),
            "messages_between_flushes": flush.get("messages_between_flushes")}


def _ann_gathers(shards: dict[str, Any] | None, refresh: dict[str, Any]) -> dict[str, Any]:
    """Sharded ANN (``PYMK_ANN_MODE=sharded``): the shards' gathers, their wall time and how much of it the state's
    lock was held for (input waits meanwhile), and the lists that waited for another gather; {} otherwise."""
    if not shards:
        return {}
    locked = refresh.get("ann_gather_seconds_locked")
    return {"ann_gathers": {"gathers": shards.get("gathers"),
                            "seconds": round(float(shards.get("gather_seconds") or 0.0), 2),
                            "seconds_with_state_lock": None if locked is None else round(float(locked), 2),
                            "lists_not_ready": refresh.get("not_ready"),
                            "peer_failures": shards.get("peer_failures")}}


def _held_globals(held: dict[str, Any] | None, refresh: dict[str, Any]) -> dict[str, Any]:
    """Reachable globals (``PYMK_GLOBALS_MODE=reachable``): the remote users held against the records read, the
    fetches from their owners (rounds, seconds, bytes), and the lists and embeddings that waited for them; {} when
    every record is kept."""
    if not held or held.get("mode") != "reachable":
        return {}
    answered = held.get("users_answered") or 0
    return {"held_globals": {
        "held_users": held.get("held_users"), "records_kept": held.get("records_kept"),
        "records_dropped": held.get("records_dropped"), "popular_order_users": held.get("popular_order_users"),
        "evicted_users": held.get("evicted_users"), "fetches": held.get("fetches"), "users_answered": answered,
        "fetch_seconds": round(float(held.get("seconds") or 0.0), 2), "bytes_received": held.get("bytes_received"),
        "bytes_per_user_answered": round(held["bytes_received"] / answered, 1) if answered else None,
        "peer_failures": held.get("peer_failures"), "lists_waited": refresh.get("lists_waiting_for_facts"),
        "embeddings_waited": refresh.get("embeddings_waiting_for_facts")}}


def _held_vectors(index: dict[str, Any] | None, held: dict[str, Any] | None) -> dict[str, Any]:
    """Sharded ANN with reachable globals: the vectors this worker keeps (its shard's users and the held remote
    users) against the records it dropped; {} when it keeps every user's."""
    if not index or index.get("vectors") != "reachable":
        return {}
    return {"held_vectors": {"vector_store_users": index.get("vector_store_users"), "shard_users": index.get("users"),
                             "records_dropped": index.get("vector_records_dropped"),
                             "rewinds": index.get("vector_rewinds"),
                             "embeddings_merged": (held or {}).get("embeddings_merged")}}


def _lists_per_core_second(refresh_stats: list[tuple[dict[str, Any], dict[str, Any], Any]],
                           clock: str = "refresh_seconds") -> float | None:
    """Lists per second of the refresher's time: wall (``refresh_seconds``, which also counts the waits for a core
    on a loaded machine) or the worker thread's CPU (``refresh_cpu_seconds``)."""
    lists = sum(int(refresh.get("refreshed") or 0) for refresh, _, _ in refresh_stats)
    seconds = sum(float(refresh.get(clock) or 0.0) for refresh, _, _ in refresh_stats)
    return round(lists / seconds, 1) if seconds > 0 else None


def _list_cache(stats: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The workers' kept lists summed (hits, misses, full builds by reason, bytes)."""
    caches = [((page.get("lists") or {}).get("cache") or {}) for page in stats]
    if not any(caches):
        return None
    reasons: dict[str, int] = {}
    for cache in caches:
        for reason, count in (cache.get("full_builds") or {}).items():
            reasons[reason] = reasons.get(reason, 0) + count
    hits = sum(int(cache.get("hits") or 0) for cache in caches)
    full = sum(reasons.values())
    return {"hits": hits, "full_builds": dict(sorted(reasons.items())),
            "hit_share": round(hits / (hits + full), 4) if hits + full else None,
            "entries": sum(int(cache.get("entries") or 0) for cache in caches),
            "bytes": sum(int(cache.get("bytes") or 0) for cache in caches),
            "max_bytes": sum(int(cache.get("max_bytes") or 0) for cache in caches),
            "bytes_per_entry": [cache.get("bytes_per_entry") for cache in caches],
            "evictions": sum(int(cache.get("evictions") or 0) for cache in caches),
            "ms_per_incremental_list": [cache.get("ms_per_incremental_list") for cache in caches],
            "ms_per_full_list": [cache.get("ms_per_full_list") for cache in caches]}


def _shadow(stats: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The shadow check summed over the workers: incremental lists recomputed fully, and how many agreed."""
    shadows = [((page.get("lists") or {}).get("shadow") or {}) for page in stats]
    if not any(shadows):
        return None
    checked = sum(int(s.get("checked") or 0) for s in shadows)
    equal = sum(int(s.get("equal") or 0) for s in shadows)
    return {"fraction": shadows[0].get("fraction"), "checked": checked, "equal": equal,
            "equal_share": round(equal / checked, 4) if checked else None,
            "scores_bit_equal": sum(int(s.get("scores_bit_equal") or 0) for s in shadows)}


def _delays(live: list[InputEvent], sent_at: list[int], published: dict[int, list[int]],
            until_ms: int | None = None) -> dict[str, Any]:
    """Delays and share of the events whose users all got a list after the event (and, with ``until_ms``, by
    then)."""
    delays: list[float] = []
    missed: dict[str, int] = {}
    slowest: list[tuple[float, str, float]] = []  # (delay, kind, seconds into the window)
    for event, t_sent in zip(live, sent_at, strict=True):
        firsts = [first_after(published, u, t_sent) for u in affected_users(event)]
        if all(f is not None and (until_ms is None or f <= until_ms) for f in firsts):
            delays.append(float(max(f for f in firsts if f is not None) - t_sent))
            slowest.append((delays[-1], event.KIND, (t_sent - sent_at[0]) / 1000.0))
        else:
            missed[event.KIND] = missed.get(event.KIND, 0) + 1
    slowest.sort(reverse=True)
    return {"delay_ms": {"p50": _percentile(delays, 0.5), "p90": _percentile(delays, 0.9),
                         "p99": _percentile(delays, 0.99), "max": max(delays, default=None)},
            # where the tail is: which events, how far into the window they were sent
            "slowest": [{"delay_ms": delay, "kind": kind, "sent_at_s": round(at, 2)}
                        for delay, kind, at in slowest[:8]],
            "events_refreshed": len(delays),
            "events_not_refreshed_by_kind": missed,
            "share_of_events_refreshed": round(len(delays) / len(live), 4) if live else None}


def _total(values: Any) -> int | None:
    """The sum over workers, None if a worker did not answer."""
    values = list(values)
    return None if any(v is None for v in values) else sum(values)


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def bench_freshness(base: Settings, rate: float = 1000.0, seconds: float = 30.0, users: int = 3000,
                    warm_share: float = 0.6, timeout_s: float = 1800.0, window_grace_s: float = 2.0,
                    workers: int = 1) -> dict[str, Any]:
    """``workers``: processes in one consumer group, sharing the partitions (Kafka's unit of scale); each has
    its own state folder and debug port, as on separate machines."""
    if workers < 1:
        raise ValueError("workers must be at least 1")
    from kafka import KafkaProducer

    from pymk.kafka_broker import LocalBroker
    from pymk.streams.lag import STARTUP_GRACE_S, consumer_lag, wait_idle
    from pymk.streams.producer import event_messages, send_messages, synthetic_events
    from pymk.streams.topics import delete_topics_with_prefix, ensure_topics

    load_at_start = os.getloadavg()
    broker = LocalBroker(base)
    if not broker.accepting():  # a broker already listening (another checkout's, a shared one) is used as is
        broker.start(quiet=True)
    tag = "fresh" + uuid.uuid4().hex[:8]
    home = Path(tempfile.mkdtemp(prefix="pymk-bench-"))
    settings = replace(base, topic_prefix=tag, app_id=f"{tag}-worker", home=home, web_port=base.web_port + 19)
    events = synthetic_events(users, seed=settings.produce_seed)
    warm = events[: int(len(events) * warm_share)]
    live = events[len(warm):][: int(rate * seconds)]
    ensure_topics(settings)
    send_messages(settings, event_messages(settings, warm), len(warm), progress=False)
    members = [replace(settings, web_port=settings.web_port + i, home=home / f"worker-{i}") for i in range(workers)]
    processes = [start_worker_process(member, home / f"worker-{i}.log") for i, member in enumerate(members)]
    urls = [f"http://{member.web_host}:{member.web_port}" for member in members]
    watcher = ListWatcher(settings)
    try:
        warm_started = time.monotonic()
        if not wait_idle(settings, timeout_s=timeout_s, worker_urls=urls, startup_grace_s=STARTUP_GRACE_S):
            raise TimeoutError(f"the warm-up did not finish in {timeout_s} s")
        warm_seconds = time.monotonic() - warm_started
        watcher.start()
        watcher.ready.wait(30)
        producer = KafkaProducer(**settings.kafka_client_config(), linger_ms=0, acks=1)
        sent_at: list[int] = []
        started = time.perf_counter()
        for i, (topic, key, value) in enumerate(event_messages(settings, live)):
            due = started + i / rate
            pause = due - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            sent_at.append(int(time.time() * 1000))
            producer.send(topic, key=key, value=value)
        producer.flush()
        send_seconds = time.perf_counter() - started
        producer.close()
        window_end = sent_at[-1] + int(window_grace_s * 1000) if sent_at else int(time.time() * 1000)
        time.sleep(max(0.0, window_end / 1000.0 - time.time()))
        healths = [_health(url) for url in urls]
        stats = [_page(url, "/stats") for url in urls]
        refresh_stats = [(page.get("refresh") or {}, (page.get("state") or {}).get("flush") or {}, page.get("gc"))
                         for page in stats]
        load_at_window_end = os.getloadavg()
        lag_at_window_end = sum(consumer_lag(settings).values())
        drain_started = time.monotonic()
        drained = wait_idle(settings, timeout_s=timeout_s, worker_urls=urls)
        drain_seconds = time.monotonic() - drain_started
        time.sleep(1.0)
    finally:
        watcher.stop_event.set()
        for process in processes:
            stop_process(process)
        delete_topics_with_prefix(settings, tag + ".")
        if not os.environ.get("PYMK_BENCH_KEEP_HOME"):  # its worker logs, for a look at what was slow
            shutil.rmtree(home, ignore_errors=True)
    watcher.join(10)
    published = watcher.snapshot()
    in_window = _delays(live, sent_at, published, until_ms=window_end)
    return {
        "bench": "freshness",
        "synthetic_users": users,
        "warm_up_events": len(warm),
        "warm_up_seconds": round(warm_seconds, 1),
        "events": len(live),
        "target_rate_per_s": rate,
        "achieved_send_rate_per_s": round(len(live) / send_seconds, 1),
        "workers": workers,
        "partitions": settings.partitions,
        "flush_interval_ms": settings.flush_interval_ms,
        "refresh_scope": settings.refresh_scope,
        "refresh_policy": {"budget_ms": settings.refresh_budget_ms, "budget_max_ms": settings.refresh_budget_max_ms,
                           "keeping_up_backlog": settings.refresh_keeping_up_backlog,
                           "catch_up_backlog": settings.refresh_catch_up_backlog,
                           "idle_budget_ms": settings.refresh_idle_budget_ms,
                           "max_staleness_ms": settings.refresh_max_staleness_ms,
                           "stale_share": settings.refresh_stale_share,
                           "between_flushes_ms": settings.refresh_between_flushes_ms},
        "window_grace_s": window_grace_s,
        **in_window,
        "per_worker_at_window_end": [{**_list_costs(refresh, flush), "gc_pauses": gc,
                                      **_ann_gathers(page.get("ann_shards"), refresh),
                                      **_held_globals(page.get("globals"), refresh),
                                      **_held_vectors(page.get("index"), page.get("globals"))}
                                     for (refresh, flush, gc), page in zip(refresh_stats, stats, strict=True)],
        # lists ranked per second of ranking time, summed over the workers (warm-up included): ranking runs on the
        # event loop's one thread, so this is lists per core-second as the worker serves them
        "lists_per_core_second": _lists_per_core_second(refresh_stats),
        "lists_per_cpu_second": _lists_per_core_second(refresh_stats, "refresh_cpu_seconds"),
        # incremental lists (ranking/incremental.py) over the run, warm-up included: the kept lists and the shadow
        # check of a sample of incremental lists against the full path (top 20, ids in order)
        "list_cache": _list_cache(stats),
        "shadow": _shadow(stats),
        "deferred_at_window_end": _total(h.get("lists_owed") for h in healths),
        "oldest_deferred_ms_at_window_end": max((h["oldest_owed_ms"] for h in healths
                                                 if h.get("oldest_owed_ms") is not None), default=None),
        "input_lag_at_window_end": lag_at_window_end,
        "after_drain": {"drained": drained, "drain_seconds": round(drain_seconds, 1),
                        **_delays(live, sent_at, published)},
        "target_p99_ms": 1000,
        "load_average_1_5_15m": {"start": [round(x, 2) for x in load_at_start],
                                 "window_end": [round(x, 2) for x in load_at_window_end],
                                 "end": [round(x, 2) for x in os.getloadavg()]},
    }
