"""`pymk consume`: reading the recommendations topic (compacted; the latest list per user wins)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

from kafka import KafkaConsumer, TopicPartition

from pymk.events import Recommendations
from pymk.settings import Settings
from pymk.streams.partitioning import partition_for_user


def read_recommendations(settings: Settings, user: int | None = None, follow: bool = False,
                         idle_timeout_ms: int = 1000) -> Iterator[Recommendations]:
    """Every recommendations record from the beginning (of ``user``'s partition only, when given).

    Without ``follow`` this stops at the end offsets seen at start; with it, it waits for new records.
    """
    topic = settings.topic("recommendations")
    consumer = KafkaConsumer(**settings.kafka_client_config(), enable_auto_commit=False, group_id=None,
                             auto_offset_reset="earliest", client_id="pymk-consume")
    try:
        if user is not None:
            partitions = [TopicPartition(topic, partition_for_user(user, settings.partitions))]
        else:
            partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        end = consumer.end_offsets(partitions)
        while follow or any(consumer.position(tp) < end[tp] for tp in partitions):
            for records in consumer.poll(timeout_ms=idle_timeout_ms).values():
                for record in records:
                    if record.value is None:  # a tombstone
                        continue
                    recs = Recommendations.from_json(record.value)
                    if user is None or recs.user == user:
                        yield recs
    finally:
        consumer.close()


def latest_per_user(records: Iterator[Recommendations]) -> dict[int, Recommendations]:
    latest: dict[int, Recommendations] = {}
    for recs in records:
        latest[recs.user] = recs
    return latest


def format_table(recs: Recommendations) -> str:
    lines = [f"user {recs.user}  generated_at {recs.generated_at}  model {recs.model_version}  "
             f"({len(recs.items)} items)"]
    lines.append(f"  {'rank':>4}  {'candidate':>12}  {'score':>8}  {'sources':<10}  reasons")
    for item in recs.items:
        reasons = ", ".join(f"{k}={json.dumps(v)}" for k, v in item.reasons.items())
        lines.append(f"  {item.rank:>4}  {item.candidate:>12}  {item.score:>8.4f}  "
                     f"{'+'.join(item.sources):<10}  {reasons}")
    return "\n".join(lines)


def print_recommendations(records: Iterator[Recommendations], as_json: bool,
                          out: Callable[[str], None] = print) -> int:
    count = 0
    for recs in records:
        out(json.dumps(recs.to_dict()) if as_json else format_table(recs))
        count += 1
    return count
