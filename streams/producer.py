"""`pymk produce`: replaying graph files, synthetic networks or raw lines into the input topics."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from kafka import KafkaProducer
from tqdm import tqdm

from pymk.datasets import load_edge_history
from pymk.events import ConnectionEvent, InputEvent, ProfileViewEvent, user_key
from pymk.settings import Settings


@dataclass(frozen=True)
class ProduceReport:
    sent: int
    by_topic: dict[str, int]
    seconds: float

    def describe(self) -> str:
        parts = ", ".join(f"{topic}: {n}" for topic, n in sorted(self.by_topic.items()))
        rate = self.sent / self.seconds if self.seconds > 0 else 0.0
        return f"produced {self.sent} messages in {self.seconds:.1f} s ({rate:,.0f}/s) — {parts}"


def make_producer(settings: Settings, **overrides: object) -> KafkaProducer:
    config: dict[str, object] = dict(
        settings.kafka_client_config(), acks="all", linger_ms=5, batch_size=256 * 1024,
        max_request_size=4 * 1024 * 1024, compression_type=None, client_id="pymk-produce",
    )
    config.update(overrides)
    return KafkaProducer(**config)


def replay_events(path: str | Path, behaviour: bool = False, seed: int = 7,
                  repeats_as_views: bool = True) -> list[InputEvent]:
    """The events of a graph file in time order: connections, later interactions as profile views, and
    (with ``behaviour``) seeded synthetic profiles, views, dismissals and engagements."""
    history = load_edge_history(path)
    events: list[InputEvent] = [ConnectionEvent(u, v, "add", ts) for u, v, ts in history.connections]
    if repeats_as_views:
        events += [ProfileViewEvent(src, dst, ts) for src, dst, ts in history.repeats]
    if behaviour:
        from pymk.synthetic import behaviour_for_replay

        events += behaviour_for_replay(history.connections, seed=seed)
    # Stable: at equal ts a connection stays before the views that follow it in the file.
    events.sort(key=lambda e: e.ts)
    return events


def synthetic_events(n_users: int, seed: int = 7) -> list[InputEvent]:
    from pymk.synthetic import SyntheticConfig, synthetic_network

    return synthetic_network(SyntheticConfig(n_users=n_users, seed=seed))


Message = tuple[str, bytes | None, bytes]  # topic, key, value


def _paced(items: Iterable[Message], rate: float | None) -> Iterator[Message]:
    if not rate:
        yield from items
        return
    start = time.monotonic()
    for index, item in enumerate(items):
        delay = start + index / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        yield item


def send_messages(settings: Settings, messages: Iterable[Message], total: int | None,
                  rate: float | None = None, progress: bool = True) -> ProduceReport:
    """Send (topic, key, value) triples in order; returns once every message is acknowledged."""
    producer = make_producer(settings)
    by_topic: Counter[str] = Counter()
    started = time.monotonic()
    try:
        bar = tqdm(total=total, unit="msg", disable=not progress, dynamic_ncols=True)
        for topic, key, value in _paced(messages, rate):
            producer.send(topic, key=key, value=value)
            by_topic[topic] += 1
            bar.update(1)
        producer.flush()
        bar.close()
    finally:
        producer.close()
    return ProduceReport(sum(by_topic.values()), dict(by_topic), time.monotonic() - started)


def event_messages(settings: Settings, events: Iterable[InputEvent]) -> Iterator[tuple[str, bytes, bytes]]:
    for event in events:
        yield settings.topic(event.KIND), user_key(event.key), event.to_json()


def raw_messages(topic: str, path: str | Path) -> Iterator[Message]:
    """Each line of the file as one message value, unchanged (the trailing newline removed)."""
    with open(path, "rb") as handle:
        for line in handle:
            yield topic, None, line.rstrip(b"\n")


def send_commands(settings: Settings, user: int | None = None, reembed: bool = False, rank: bool = True) -> int:
    """``pymk refresh``: one command for a user (keyed by it), or one per partition for every user; ``reembed``
    re-embeds first, ``rank=False`` only re-embeds."""
    import json

    topic = settings.topic("commands")
    producer = make_producer(settings)
    try:
        if user is not None:
            value = json.dumps({"command": "refresh", "user": user, "reembed": reembed, "rank": rank}).encode()
            producer.send(topic, key=user_key(user), value=value)
            count = 1
        else:
            value = json.dumps({"command": "refresh", "all": True, "reembed": reembed, "rank": rank}).encode()
            for partition in range(settings.partitions):
                producer.send(topic, key=b"all", value=value, partition=partition)
            count = settings.partitions
        producer.flush()
        return count
    finally:
        producer.close()
