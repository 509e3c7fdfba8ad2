"""Tier 3: faust-streaming creates its internal topics (changelog, repartition, leader) on our broker and
writes table changes to the changelog. This is why Kafka 4.x is the chosen release (see docs/operations.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from kafka import KafkaConsumer, TopicPartition

from conftest import free_port
from pymk.settings import Settings
from pymk.streams.producer import make_producer
from pymk.streams.topics import TopicSpec, admin_client, ensure_topics
from workers import stop_process, wait_until


def test_faust_creates_changelog_repartition_and_leader_topics(kafka_settings: Settings, tmp_path: Path) -> None:
    app_id = kafka_settings.app_id + "-probe"
    topic = kafka_settings.topic("visits")
    ensure_topics(kafka_settings, [TopicSpec(topic, 4, {})])

    env = {**os.environ, "PROBE_APP_ID": app_id, "PROBE_BOOTSTRAP": kafka_settings.bootstrap,
           "PROBE_DATADIR": str(tmp_path / "data"), "PROBE_WEB_PORT": str(free_port()), "PROBE_TOPIC": topic}
    log = open(tmp_path / "faust.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "faust", "-A", "faust_probe_app", "worker", "-l", "info"],
                            cwd=Path(__file__).parent, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    changelog = f"{app_id}-per_page-changelog"
    try:
        admin = admin_client(kafka_settings)

        def internal_topics_exist() -> bool:
            topics = set(admin.list_topics())
            if not (changelog in topics and f"{app_id}-__assignor-__leader" in topics
                    and any(t.endswith("by_page-repartition") for t in topics)):
                return False
            # Created is not yet served: faust reads a changelog listed with 0 partitions as a mismatch with its
            # source and crashes the agent (PartitionsMismatch). The visits go in once all 4 are served.
            return len(admin.describe_topics([changelog])[0]["partitions"]) == 4

        try:
            wait_until(internal_topics_exist, 90, what="faust internal topics")
        finally:
            admin.close()
        producer = make_producer(kafka_settings)
        for i in range(40):
            producer.send(topic, key=str(i).encode(),
                          value=json.dumps({"user": str(i), "page": f"p{i % 5}"}).encode())
        producer.flush()
        producer.close()
        # The table's updates reach its changelog: the last value per page adds up to the 40 visits.
        consumer = KafkaConsumer(**kafka_settings.kafka_client_config(), group_id=None)
        partitions = [TopicPartition(changelog, p) for p in range(4)]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        latest: dict[bytes, int] = {}

        def all_counted() -> bool:
            for records in consumer.poll(timeout_ms=500).values():
                for record in records:
                    latest[record.key] = int(json.loads(record.value))
            return sum(latest.values()) == 40

        wait_until(all_counted, 90, interval=0, what=f"changelog totals (log {tmp_path / 'faust.log'})")
        consumer.close()
        assert len(latest) == 5
    finally:
        stop_process(proc)
        log.close()
