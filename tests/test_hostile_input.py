"""Tier 3: a seeded corpus of 1,100 hostile messages (tests/hostile.py) interleaved with valid events of every
kind across the five input topics, through the real broker into a real worker. The worker neither crashes nor
stalls; every bad message has exactly one dead letter, at its own topic/partition/offset and with its reason,
and no valid message has one; every valid event is applied (graph, behaviour and profile features exact)."""

from __future__ import annotations

import math
import random
import time
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import networkx as nx
from kafka import KafkaConsumer, TopicPartition
from test_stream_features import assert_pairs_exact, assert_users_exact, sample_pairs

from conftest import EGO_FACEBOOK
from hostile import ITEM_BASE, HostileMessage, hostile_corpus
from pymk.datasets import load_edge_history
from pymk.events import (
    ConnectionEvent,
    DeadLetter,
    DismissalEvent,
    EngagementEvent,
    InputEvent,
    Profile,
    ProfileViewEvent,
    UserEvent,
    user_key,
)
from pymk.settings import Settings
from pymk.streams.lag import wait_idle
from pymk.streams.producer import make_producer
from pymk.streams.topics import ensure_topics
from workers import http_get, metric_samples, running_worker

EGO = EGO_FACEBOOK
N_BAD = 1_100
N_ODD_VALID = 150


def valid_events(rng: random.Random, connections: list[ConnectionEvent], users: list[int]) -> list[InputEvent]:
    """The small graph's connections, some removals and re-adds, duplicates, and every other kind of event."""
    last = connections[-1].ts
    events: list[InputEvent] = list(connections)
    removed = rng.sample(connections, 150)
    events += [ConnectionEvent(e.dst, e.src, "remove", last + 1000 * (i + 1)) for i, e in enumerate(removed)]
    events += [ConnectionEvent(e.src, e.dst, "add", last + 10**6 + i) for i, e in enumerate(removed[:40])]
    events += rng.sample(events, 100)  # at-least-once producers
    ts = last + 10**7
    for _ in range(600):
        ts += rng.randint(1, 1000)
        a, b = rng.sample(users, 2)
        events.append(ProfileViewEvent(a, b, ts))
    for _ in range(250):
        ts += rng.randint(1, 1000)
        a, b = rng.sample(users, 2)
        events.append(DismissalEvent(a, b, ts))
    for _ in range(400):
        ts += rng.randint(1, 1000)
        events.append(EngagementEvent(rng.choice(users[:200]), ITEM_BASE + rng.randrange(60), ts))
    for _ in range(300):
        ts += rng.randint(1, 1000)
        events.append(UserEvent(rng.choice(users[:250]), ts, Profile(
            company=rng.choice(["Acme", "Globex", None]), title=rng.choice(["cto", "nurse", None]),
            skills=tuple(rng.sample(["go", "sql", "rust"], rng.randint(0, 2))) if rng.random() < 0.5 else None,
            geo=(rng.uniform(-90, 90), rng.uniform(-180, 180)) if rng.random() < 0.5 else None)))
    return events


def oracle_graph(events: list[InputEvent]) -> nx.Graph:
    """Last writer wins per pair: version 2·ts + (1 if remove), the highest version decides (docs/architecture.md)."""
    version: dict[frozenset[int], int] = {}
    for e in events:
        if isinstance(e, ConnectionEvent):
            pair = frozenset((e.src, e.dst))
            version[pair] = max(version.get(pair, -1), 2 * e.ts + (e.action == "remove"))
    graph = nx.Graph()
    graph.add_edges_from(tuple(pair) for pair, v in version.items() if v % 2 == 0)
    return graph


def oracle_profiles(events: list[InputEvent]) -> dict[int, dict[str, Any]]:
    """Per user and field, the value of the latest event that gave the field."""
    latest: dict[int, dict[str, tuple[int, Any]]] = defaultdict(dict)
    for e in events:
        if isinstance(e, UserEvent):
            for name, value in e.profile.to_dict().items():
                if name not in latest[e.user] or latest[e.user][name][0] < e.ts:
                    latest[e.user][name] = (e.ts, value)
    return {u: {name: value for name, (_, value) in fields.items()} for u, fields in latest.items()}


def produce(settings: Settings, plan: list[tuple[str, bytes | None, bytes | None, HostileMessage | None]]
            ) -> dict[tuple[str, int, int], HostileMessage]:
    """Send every message in order; return the coordinates of each bad one."""
    producer = make_producer(settings)
    futures = [(producer.send(topic, key=key, value=value), hostile) for topic, key, value, hostile in plan]
    producer.flush(timeout=120)
    coordinates: dict[tuple[str, int, int], HostileMessage] = {}
    for future, hostile in futures:
        meta = future.get(timeout=60)
        if hostile is not None and hostile.bad:
            coordinates[(meta.topic, meta.partition, meta.offset)] = hostile
    producer.close()
    return coordinates


def read_all(settings: Settings, topic: str) -> list[Any]:
    """Every record of the topic up to its current end offsets."""
    consumer = KafkaConsumer(**settings.kafka_client_config(), group_id=None, enable_auto_commit=False,
                             fetch_max_bytes=16 * 1024 * 1024, max_partition_fetch_bytes=8 * 1024 * 1024)
    try:
        partitions = [TopicPartition(topic, p) for p in range(settings.partitions)]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        end = consumer.end_offsets(partitions)
        records: list[Any] = []
        deadline = time.monotonic() + 60
        while any(consumer.position(tp) < end[tp] for tp in partitions):
            assert time.monotonic() < deadline, "reading the dead-letter topic timed out"
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
        return records
    finally:
        consumer.close()


def test_hostile_corpus_is_dead_lettered_exactly_and_valid_events_apply(kafka_settings: Settings,
                                                                        tmp_path: Path) -> None:
    settings = replace(kafka_settings, recommend=False)  # features only (lists are tested elsewhere)
    rng = random.Random(2024)
    connections = [ConnectionEvent(u, v, "add", ts) for u, v, ts in load_edge_history(EGO).connections[:2_000]]
    users = sorted({u for e in connections for u in (e.src, e.dst)})
    good = valid_events(rng, connections, users)
    corpus = hostile_corpus(seed=7, users=users, now_ms=int(time.time() * 1000), n_bad=N_BAD,
                            n_odd_valid=N_ODD_VALID, max_bytes=settings.max_message_bytes)
    bad = [m for m in corpus if m.bad]
    assert len(bad) == N_BAD and {m.kind for m in bad} == set(settings.input_topics)
    applied = good + [m.event for m in corpus if not m.bad and m.event is not None]

    plan: list[tuple[str, bytes | None, bytes | None, HostileMessage | None]] = [
        (settings.topic(e.KIND), user_key(e.key), e.to_json(), None) for e in good]
    plan += [(settings.topic(m.kind), m.key, m.value, m) for m in corpus]
    rng.shuffle(plan)  # order is free: every state is a last-writer-wins register or a set

    ensure_topics(settings)
    expected = produce(settings, plan)
    assert len(expected) == N_BAD

    log = tmp_path / "worker.log"
    with running_worker(settings, log) as worker:
        assert wait_idle(settings, timeout_s=180), f"the worker stalled (log: {log})"
        assert worker.poll() is None, "the worker exited"
        assert http_get(settings, "/health")["status"] == "ok"
        stats = http_get(settings, "/stats")
        metrics = metric_samples(settings)

        # -- dead letters: exactly one per bad message, with its reason; none for a valid one
        letters = [DeadLetter.from_json(r.value) for r in read_all(settings, settings.topic("dead-letter"))]
        coordinates = Counter((dl.topic, dl.partition, dl.offset) for dl in letters)
        assert [c for c, n in coordinates.items() if n > 1] == [], "a message was dead-lettered more than once"
        assert set(coordinates) - set(expected) == set(), "a valid message was dead-lettered"
        missing = [(expected[c].case, expected[c].expected) for c in set(expected) - set(coordinates)]
        assert missing == [], f"bad messages without a dead letter: {Counter(missing)}"
        wrong: Counter[tuple[str, str | None, str]] = Counter()
        for dl in letters:
            sent, code = expected[(dl.topic, dl.partition, dl.offset)], dl.reason.split(":")[0]
            if code != sent.expected:
                wrong[(sent.case, sent.expected, code)] += 1
        assert not wrong, f"(case, expected, got): {wrong}"
        for dl in letters:
            sent = expected[(dl.topic, dl.partition, dl.offset)]
            value = sent.value or b""
            assert dl.size == len(value) and dl.truncated == (len(value) > settings.max_message_bytes)
            assert dl.raw_bytes() == value[:settings.max_message_bytes]
            assert dl.reason.split(":", 1)[1].strip(), "a reason explains the code"
        assert sum(stats["events_invalid"].values()) == N_BAD
        for code, count in Counter(m.expected for m in bad).items():
            assert metrics[("pymk_dead_letters_total", (("reason", code),))] == count

        # -- every valid event applied: the graph
        graph = oracle_graph(applied)
        check = random.Random(3)
        assert_pairs_exact([settings], graph, sample_pairs(graph, 400, check))
        odd_users = sorted({u for m in corpus if isinstance(m.event, ConnectionEvent)
                            for u in (m.event.src, m.event.dst) if u in graph})
        assert_users_exact([settings], graph, check.sample(sorted(graph), 15) + odd_users[:15])

        # -- behaviour: distinct view / dismissal timestamps per pair, co-engagement
        views: dict[tuple[int, int], set[int]] = defaultdict(set)
        dismissals: dict[tuple[int, int], set[int]] = defaultdict(set)
        first_engaged: dict[int, dict[int, int]] = defaultdict(dict)
        for e in applied:
            if isinstance(e, ProfileViewEvent):
                views[(e.viewer, e.viewed)].add(e.ts)
            elif isinstance(e, DismissalEvent):
                dismissals[(e.user, e.candidate)].add(e.ts)
            elif isinstance(e, EngagementEvent):
                items = first_engaged[e.user]
                items[e.item] = min(items.get(e.item, e.ts), e.ts)
        for viewer, viewed in check.sample(sorted(views), 150):
            stamps = views[(viewer, viewed)]
            out = http_get(settings, f"/features/{viewer}/{viewed}")["features"]
            assert out["query_viewed_candidate_profile"] == {"value": len(stamps), "ts": max(stamps)}
            back = http_get(settings, f"/features/{viewed}/{viewer}")["features"]
            assert back["candidate_viewed_query_profile"] == {"value": len(stamps), "ts": max(stamps)}
        for user, candidate in check.sample(sorted(dismissals), 80):
            got = http_get(settings, f"/features/{user}/{candidate}")["features"]["dismissed"]
            assert got == {"value": 1, "ts": max(dismissals[(user, candidate)])}
        engagers = sorted(first_engaged)
        for _ in range(120):
            u, v = check.sample(engagers, 2)
            shared = first_engaged[u].keys() & first_engaged[v].keys()
            got = http_get(settings, f"/features/{u}/{v}")["features"]["co_engaged_with_content"]
            expected_ts = max((max(first_engaged[u][i], first_engaged[v][i]) for i in shared), default=None)
            assert got == {"value": len(shared), "ts": expected_ts}, (u, v)
            assert http_get(settings, f"/users/{u}")["behaviour"]["items_engaged"] == len(first_engaged[u])

        # -- profiles: last writer wins per field (odd-but-valid sign-ups included)
        for user, fields in oracle_profiles(applied).items():
            got = http_get(settings, f"/users/{user}")["profile"] or {}
            assert got.keys() == fields.keys(), user
            for name, value in fields.items():
                if name == "geo":
                    assert all(math.isclose(a, b) for a, b in zip(got[name], value, strict=True)), user
                else:
                    assert got[name] == value, (user, name)

        assert worker.poll() is None, "the worker exited while being queried"
    assert "Traceback" not in log.read_text(errors="replace"), f"an error was logged (see {log})"
