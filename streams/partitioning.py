"""Which partition holds a user: the same murmur2 rule as Kafka's Java client, kafka-python and aiokafka,
applied to the decimal user-id key, so every producer and every worker agrees on it."""

from __future__ import annotations

from kafka.partitioner.default import murmur2

from pymk.events import user_key


def partition_for_key(key: bytes, partitions: int) -> int:
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def partition_for_user(user: int, partitions: int) -> int:
    return partition_for_key(user_key(user), partitions)
