"""Creating the topics of the contract on the broker, idempotently.

Input topics and every user-keyed output topic get ``settings.partitions`` partitions so that all of them
are co-partitioned (user u is in the same partition number everywhere). The recommendations topic is
compacted: it holds the latest list per user.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

from pymk.events import UNSHOWN_KIND
from pymk.settings import INPUT_KINDS, Settings


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str]


def contract_topics(settings: Settings) -> list[TopicSpec]:
    n = settings.partitions
    specs = [TopicSpec(settings.topic(kind), n, {}) for kind in INPUT_KINDS]
    specs.append(TopicSpec(settings.topic("recommendations"), n,
                           {"cleanup.policy": "compact", "min.cleanable.dirty.ratio": "0.1",
                            "segment.ms": "600000"}))
    specs.append(TopicSpec(settings.topic("impressions"), n, {}))
    # our extension: each published list's sample of unshown candidates, one record per list (keyed by user)
    specs.append(TopicSpec(settings.topic(UNSHOWN_KIND), n, {"max.message.bytes": str(4 * 1024 * 1024)}))
    specs.append(TopicSpec(settings.topic("dead-letter"), n, {"max.message.bytes": str(4 * 1024 * 1024)}))
    return specs + internal_topics(settings)


def internal_topics(settings: Settings) -> list[TopicSpec]:
    """The workers' own topics: messages between partitions (co-partitioned with the inputs); the compacted
    tables every worker reads in full (every user's degree and profile; every user's embedding, for the ANN
    index each worker keeps); and the commands (``pymk refresh``), co-partitioned with the inputs."""
    n = settings.partitions
    compacted = {"cleanup.policy": "compact", "min.cleanable.dirty.ratio": "0.1", "segment.ms": "600000"}
    return [
        TopicSpec(settings.topic("partition-messages"), n, {"max.message.bytes": str(4 * 1024 * 1024)}),
        TopicSpec(settings.topic("user-globals"), n, dict(compacted)),
        TopicSpec(settings.topic("embeddings"), n, dict(compacted)),
        TopicSpec(settings.topic("commands"), n, {}),
    ]


def admin_client(settings: Settings) -> KafkaAdminClient:
    return KafkaAdminClient(**settings.kafka_client_config(), client_id="pymk-admin")


def ensure_topics(settings: Settings, specs: list[TopicSpec] | None = None) -> list[str]:
    """Create the missing topics; return the names created. Existing topics are checked for partition count."""
    specs = contract_topics(settings) if specs is None else specs
    admin = admin_client(settings)
    try:
        existing = set(admin.list_topics())
        missing = [s for s in specs if s.name not in existing]
        created: list[str] = []
        if missing:
            new = [NewTopic(s.name, s.partitions, settings.replication_factor, topic_configs=s.config)
                   for s in missing]
            try:
                admin.create_topics(new, timeout_ms=30_000)
                created = [s.name for s in missing]
            except TopicAlreadyExistsError:  # another process created them at the same moment
                created = []
        _wait_for_metadata(admin, [s.name for s in specs])
        for spec, found in zip(specs, partition_counts(admin, [s.name for s in specs]), strict=True):
            if found != spec.partitions:
                raise RuntimeError(
                    f"topic {spec.name} has {found} partitions, pymk is configured for {spec.partitions} "
                    f"(PYMK_PARTITIONS); co-partitioning needs them equal"
                )
        return created
    finally:
        admin.close()


def partition_counts(admin: KafkaAdminClient, names: list[str]) -> list[int]:
    described = {t.get("name", t.get("topic")): len(t["partitions"] or []) for t in admin.describe_topics(names)}
    return [described.get(name, 0) for name in names]


def _wait_for_metadata(admin: KafkaAdminClient, names: list[str], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(count > 0 for count in partition_counts(admin, names)):
            return
        time.sleep(0.1)
    raise TimeoutError(f"topics {names} did not appear in the broker's metadata within {timeout_s} s")


def delete_topics_with_prefix(settings: Settings, prefix: str) -> list[str]:
    """Delete every topic whose name starts with ``prefix`` (tests clean up after themselves)."""
    return _delete_topics(settings, lambda name: name.startswith(prefix))


def delete_topics_tagged(settings: Settings, tag: str) -> list[str]:
    """Delete every topic whose name contains ``tag`` (a test's own topics, whatever prefix it derived from
    its tag, faust's internal topics included): a broker serving a long test session keeps a few open files
    per partition, and thousands of leftover partitions exhaust them."""
    return _delete_topics(settings, lambda name: tag in name)


def _delete_topics(settings: Settings, doomed_if: Callable[[str], bool]) -> list[str]:
    admin = admin_client(settings)
    try:
        doomed = [t for t in admin.list_topics() if doomed_if(t)]
        if doomed:
            admin.delete_topics(doomed, timeout_ms=30_000)
        return doomed
    finally:
        admin.close()
