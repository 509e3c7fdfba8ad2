"""Tier 3: bad input of every class lands in the dead-letter topic with its reason, through a real worker,
while the valid events interleaved with it all arrive."""

from __future__ import annotations

import json
import random
from pathlib import Path

from kafka import KafkaConsumer, TopicPartition

from pymk.events import ConnectionEvent, DeadLetter, ProfileViewEvent, UserEvent, user_key
from pymk.settings import Settings
from pymk.streams.producer import make_producer
from pymk.streams.topics import ensure_topics
from workers import http_get, metric_samples, running_worker, wait_until

NOW_MS = 1_700_000_000_000


def bad_corpus(rng: random.Random) -> list[tuple[str, bytes, str]]:
    """(kind, value, expected reason code) for each class the foundation issue names, several times over."""
    ok = {"src": 1, "dst": 2, "action": "add", "ts": NOW_MS}
    cases: list[tuple[str, bytes, str]] = []
    for i in range(3):
        cases += [
            ("connections", b'{"src": 1, "dst": 2, "action": "add"' + str(i).encode(), "invalid_json"),
            ("connections", rng.randbytes(40) + b"\xff", "invalid_utf8"),
            ("connections", json.dumps([1, 2, i]).encode(), "not_an_object"),
            ("connections", json.dumps({"src": 1, "action": "add", "ts": NOW_MS, "i": i}).encode(), "missing_field"),
            ("connections", json.dumps(ok | {"src": "12", "i": i}).encode(), "wrong_type"),
            ("connections", json.dumps(ok | {"src": 3.5, "i": i}).encode(), "wrong_type"),
            ("connections", json.dumps(ok | {"dst": -7, "i": i}).encode(), "invalid_id"),
            ("connections", json.dumps(ok | {"dst": 2**64 + i}).encode(), "invalid_id"),
            ("connections", json.dumps(ok | {"dst": 1, "i": i}).encode(), "self_connection"),
            ("connections", json.dumps(ok | {"action": "poke", "i": i}).encode(), "unknown_action"),
            ("connections", json.dumps(ok | {"ts": "yesterday", "i": i}).encode(), "invalid_timestamp"),
            ("connections", json.dumps(ok | {"ts": 2**62 + i}).encode(), "future_timestamp"),
            ("profile-views", b"x" * (70_000 + i), "oversize"),
            ("users", json.dumps({"user": i, "ts": NOW_MS, "profile": {"geo": "here"}}).encode(), "wrong_type"),
            ("dismissals", json.dumps({"user": None, "candidate": 2, "ts": NOW_MS}).encode(), "wrong_type"),
            ("engagements", b"", "invalid_json"),
        ]
    return cases


def valid_events(rng: random.Random, n: int) -> list:
    events = []
    for i in range(n):
        a, b = rng.sample(range(1000), 2)
        kind = i % 3
        if kind == 0:
            events.append(ConnectionEvent(a, b, "add", NOW_MS + i))
        elif kind == 1:
            events.append(ProfileViewEvent(a, b, NOW_MS + i))
        else:
            events.append(UserEvent(a, NOW_MS + i))
    return events


def test_bad_input_is_dead_lettered_and_valid_input_arrives(kafka_settings: Settings, tmp_path: Path) -> None:
    rng = random.Random(42)
    ensure_topics(kafka_settings)
    bad = bad_corpus(rng)
    good = valid_events(rng, 300)
    # Interleave: every bad message sits between valid ones.
    plan: list[tuple[str, bytes | None, bytes, str | None]] = []
    good_iter = iter(good)
    for kind, value, reason in bad:
        for _ in range(5):
            event = next(good_iter)
            plan.append((kafka_settings.topic(event.KIND), user_key(event.key), event.to_json(), None))
        plan.append((kafka_settings.topic(kind), user_key(rng.randrange(1000)), value, reason))
    for event in good_iter:
        plan.append((kafka_settings.topic(event.KIND), user_key(event.key), event.to_json(), None))

    producer = make_producer(kafka_settings)
    expected_letters: dict[tuple[str, int, int], str] = {}
    for topic, key, value, reason in plan:
        meta = producer.send(topic, key=key, value=value).get(timeout=30)
        if reason is not None:
            expected_letters[(topic, meta.partition, meta.offset)] = reason
    producer.close()

    with running_worker(kafka_settings, tmp_path / "worker.log"):
        def processed() -> bool:
            stats = http_get(kafka_settings, "/stats")
            return (sum(stats["events_valid"].values()) >= len(good)
                    and sum(stats["events_invalid"].values()) >= len(bad))

        wait_until(processed, 120, what="all messages processed")
        stats = http_get(kafka_settings, "/stats")
        metrics = metric_samples(kafka_settings)
        letters = read_dead_letters(kafka_settings, len(expected_letters))

    # Every valid event arrived, once.
    by_kind: dict[str, int] = {}
    for event in good:
        by_kind[event.KIND] = by_kind.get(event.KIND, 0) + 1
    assert stats["events_valid"] == by_kind
    # Every bad message is in the dead-letter topic with its source coordinates and reason.
    got = {(dl.topic, dl.partition, dl.offset): dl.reason.split(":")[0] for dl in letters}
    assert got == expected_letters
    # the raw bytes are kept (base64 where not UTF-8), cut at the size limit for oversize messages
    sent_values = {(t, v) for t, _, v, r in plan if r}
    for dl in letters:
        if dl.truncated:
            assert dl.size > kafka_settings.max_message_bytes
        else:
            assert (dl.topic, dl.raw_bytes()) in sent_values
    # a counter per reason
    for reason in set(expected_letters.values()):
        count = sum(1 for r in expected_letters.values() if r == reason)
        assert metrics[("pymk_dead_letters_total", (("reason", reason),))] == count


def read_dead_letters(settings: Settings, expected: int) -> list[DeadLetter]:
    topic = settings.topic("dead-letter")
    consumer = KafkaConsumer(**settings.kafka_client_config(), group_id=None, enable_auto_commit=False)
    partitions = [TopicPartition(topic, p) for p in range(settings.partitions)]
    consumer.assign(partitions)
    consumer.seek_to_beginning(*partitions)
    letters: list[DeadLetter] = []

    def more() -> bool:
        for records in consumer.poll(timeout_ms=500).values():
            letters.extend(DeadLetter.from_json(r.value) for r in records)
        return len(letters) >= expected

    wait_until(more, 60, interval=0, what="dead letters read")
    consumer.close()
    return letters
