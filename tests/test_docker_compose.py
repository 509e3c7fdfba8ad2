"""docker-compose.yml cannot run here (no Docker engine); check it agrees with the settings the code reads."""

from __future__ import annotations

import yaml

from conftest import REPO
from pymk.settings import Settings, settings_env_names


def load() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_services() -> None:
    assert set(load()["services"]) == {"kafka", "worker"}


def test_kafka_service_matches_the_local_broker() -> None:
    defaults = Settings.from_env({})
    kafka = load()["services"]["kafka"]
    assert kafka["image"] == f"apache/kafka:{defaults.kafka_version}"
    assert f"127.0.0.1:{defaults.kafka_port}:{defaults.kafka_port}" in kafka["ports"]
    env = kafka["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert int(env["KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS"]) == 0
    assert int(env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"]) == 1
    assert int(env["KAFKA_NUM_PARTITIONS"]) == defaults.partitions
    assert f"127.0.0.1:{defaults.kafka_port}" in env["KAFKA_ADVERTISED_LISTENERS"]


def test_worker_environment_is_read_by_the_settings() -> None:
    worker = load()["services"]["worker"]
    env = {k: str(v) for k, v in worker["environment"].items()}
    unknown = set(env) - settings_env_names()
    assert not unknown, f"docker-compose sets variables the code never reads: {unknown}"
    settings = Settings.from_env(env)
    defaults = Settings.from_env({})
    # Same topic names, partitioning and consumer group as the local set-up.
    assert settings.input_topics == defaults.input_topics
    assert (settings.partitions, settings.app_id) == (defaults.partitions, defaults.app_id)
    assert settings.bootstrap.split(":")[0] == "kafka"
    assert f"127.0.0.1:{settings.web_port}:{settings.web_port}" in worker["ports"]
    assert worker["command"][:2] == ["pymk", "worker"]
