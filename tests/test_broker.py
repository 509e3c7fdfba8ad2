"""Tier 3: the project's own Apache Kafka broker starts, is idempotent to start, reports status, stops."""

from __future__ import annotations

import base64
from dataclasses import replace
from pathlib import Path

from conftest import free_port
from pymk.kafka_broker import LocalBroker, _metadata_ready, new_cluster_id
from pymk.settings import Settings


def test_second_broker_start_idempotent_status_stop(broker_settings: Settings, tmp_path: Path) -> None:
    # A broker of its own on other ports, so the session's broker keeps serving the other tests.
    settings = replace(broker_settings, home=tmp_path, kafka_port=free_port(), kafka_controller_port=free_port())
    broker = LocalBroker(settings)
    assert not broker.status().running
    first = broker.start()
    try:
        assert first.running and first.accepting and first.pid
        assert _metadata_ready(settings)
        assert broker.log_file.exists() and broker.log_file.stat().st_size > 0
        assert broker.pid_file.read_text().strip() == str(first.pid)
        again = broker.start()  # idempotent: the same process, no second broker
        assert again.pid == first.pid
    finally:
        assert broker.stop()
    status = broker.status()
    assert not status.running and not status.accepting
    assert not broker.stop()  # stopping twice is harmless
    # Only that broker stopped: the session's broker still serves.
    assert LocalBroker(broker_settings).accepting()


def test_restart_keeps_topics(broker_settings: Settings, tmp_path: Path) -> None:
    from pymk.streams.topics import admin_client, ensure_topics

    settings = replace(broker_settings, home=tmp_path, kafka_port=free_port(), kafka_controller_port=free_port())
    broker = LocalBroker(settings)
    broker.start()
    try:
        ensure_topics(settings)
        broker.stop()
        broker.start()
        admin = admin_client(settings)
        try:
            assert settings.topic("connections") in admin.list_topics()
        finally:
            admin.close()
    finally:
        broker.stop()


def test_status_of_a_stale_pid_file(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, kafka_port=free_port())
    broker = LocalBroker(settings)
    broker.dir.mkdir(parents=True)
    broker.pid_file.write_text("1\n")  # pid 1 is alive but is not our broker
    assert not broker.status().running
    assert not broker.stop()


def test_cluster_ids_never_start_with_a_dash() -> None:
    """One id in 64 did, and the storage tool then read it as an option: formatting failed (seen in CI)."""
    ids = [new_cluster_id() for _ in range(2_000)]  # P(no leading dash among 2,000 old ids) ≈ 2e-14
    assert not [i for i in ids if i.startswith("-")]
    assert all(len(base64.urlsafe_b64decode(i + "==")) == 16 for i in ids)  # still a UUID's 16 bytes
    assert len(set(ids)) == len(ids)
