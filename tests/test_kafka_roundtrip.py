"""Tier 3: every event type produced with kafka-python is read back with aiokafka, keyed and intact."""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaConsumer, TopicPartition

from pymk.events import (
    ConnectionEvent,
    DismissalEvent,
    EngagementEvent,
    Profile,
    ProfileViewEvent,
    RecommendationItem,
    Recommendations,
    UserEvent,
    user_key,
)
from pymk.settings import Settings
from pymk.streams.partitioning import partition_for_user
from pymk.streams.producer import event_messages, send_messages
from pymk.streams.topics import ensure_topics
from pymk.validation import parse_event

EVENTS = [
    ConnectionEvent(1, 2, "add", 1_700_000_000_000),
    ConnectionEvent(3, 1, "remove", 1_700_000_000_500),
    ProfileViewEvent(4, 5, 1_700_000_001_000),
    DismissalEvent(6, 7, 1_700_000_002_000),
    EngagementEvent(8, 1_000_000_123, 1_700_000_003_000),
    UserEvent(9, 1_700_000_004_000, Profile(company="Acme", school="Uni", industry="software",
                                            title="staff engineer", skills=("python", "kafka"), geo=(48.1, 11.6))),
]


async def read_all(settings: Settings, topic: str, expected: int) -> list:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(settings.partitions)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        records: list = []
        deadline = asyncio.get_running_loop().time() + 30
        while len(records) < expected and asyncio.get_running_loop().time() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for items in batch.values():
                records.extend(items)
        return records
    finally:
        await consumer.stop()


def test_each_event_type_round_trips(kafka_settings: Settings) -> None:
    ensure_topics(kafka_settings)
    report = send_messages(kafka_settings, event_messages(kafka_settings, EVENTS), len(EVENTS), progress=False)
    assert report.sent == len(EVENTS)
    for kind in {e.KIND for e in EVENTS}:
        sent = [e for e in EVENTS if kind == e.KIND]
        records = asyncio.run(read_all(kafka_settings, kafka_settings.topic(kind), len(sent)))
        received = [parse_event(kind, r.value, 1_800_000_000_000) for r in records]
        assert sorted(received, key=lambda e: e.ts) == sent
        # keyed by user: each record sits in its user's partition (the same rule every worker uses)
        for record, event in zip(records, received, strict=True):
            assert record.key == user_key(event.key)
            assert record.partition == partition_for_user(event.key, kafka_settings.partitions)


def test_recommendations_topic_is_compacted_and_round_trips(kafka_settings: Settings) -> None:
    from pymk.streams.consumer import latest_per_user, read_recommendations
    from pymk.streams.topics import admin_client

    ensure_topics(kafka_settings)
    admin = admin_client(kafka_settings)
    try:
        from kafka.admin import ConfigResource, ConfigResourceType

        topic = kafka_settings.topic("recommendations")
        result = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
        text = str(result)
        assert "cleanup.policy" in text and "compact" in text
    finally:
        admin.close()
    lists = [
        Recommendations(10, 1, "m1", (RecommendationItem(11, 0.9, 1, ("graph",), {"mutual_connections": 3,
                                                                                 "mutual_examples": [1, 2, 3]}),)),
        Recommendations(10, 2, "m1", (RecommendationItem(12, 0.8, 1, ("ann",), {"similar_profile": True}),)),
        Recommendations(20, 3, "m1", ()),
    ]
    messages = [(kafka_settings.topic("recommendations"), user_key(r.user), r.to_json()) for r in lists]
    send_messages(kafka_settings, iter(messages), len(messages), progress=False)
    latest = latest_per_user(read_recommendations(kafka_settings))
    assert latest == {10: lists[1], 20: lists[2]}
    only = list(read_recommendations(kafka_settings, user=20))
    assert only == [lists[2]]
