"""Test session set-up: the real Kafka broker, and per-test isolated settings.

The session starts the local broker when none is listening and stops only what it started. Tests that
talk to Kafka take the ``kafka_settings`` fixture: settings with a topic prefix, consumer group and web
port of their own, so tests never see each other's messages. There is no skip when the broker is missing:
a broker that cannot start fails the tests that need it.
"""

from __future__ import annotations

import os
import random
import socket
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from kafka.errors import KafkaError

from pymk.kafka_broker import LocalBroker
from pymk.settings import Settings
from pymk.streams.topics import delete_topics_tagged

REPO = Path(__file__).resolve().parent.parent
BUNDLED_DATA = REPO / "data"
EGO_FACEBOOK = BUNDLED_DATA / "ego-facebook" / "facebook_combined.txt.gz"


def _ephemeral_ports_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_PORT_PICKER = random.Random()  # seeded from the OS: concurrent sessions do not walk the same sequence


def free_port() -> int:
    """A port nothing listens on, below the kernel's ephemeral range. A port from the ephemeral range (binding to
    port 0) can be handed to an outgoing connection (a Kafka client's, say) between this check and the worker's
    bind: CI saw a worker die with "address already in use" and the test wait 600 s for it."""
    high = _ephemeral_ports_start()
    for _ in range(500):
        port = _PORT_PICKER.randrange(20000, high)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in 20000-{high - 1}")


@pytest.fixture(scope="session")
def broker_settings() -> Iterator[Settings]:
    """Settings of the session's broker (the default local one, under the repo's .pymk folder)."""
    settings = Settings.from_env(home=REPO / ".pymk")
    broker = LocalBroker(settings)
    started_here = False
    if not broker.accepting():
        broker.start()
        started_here = True
    yield settings
    if started_here and not os.environ.get("PYMK_KEEP_BROKER"):
        broker.stop()


@pytest.fixture
def kafka_settings(broker_settings: Settings, tmp_path: Path) -> Iterator[Settings]:
    """Settings isolated for one test: own topic prefix, consumer group, web port and state folder. The test's
    topics (every name containing its tag) are deleted afterwards."""
    tag = "t" + uuid.uuid4().hex[:10]
    yield replace(broker_settings, topic_prefix=f"{tag}.pymk", app_id=f"{tag}-worker",
                  web_port=free_port(), home=tmp_path / "home")
    try:
        delete_topics_tagged(broker_settings, tag)
    except KafkaError as error:  # clean-up only: the test's verdict is already in
        warnings.warn(f"could not delete the topics of {tag}: {error!r}", stacklevel=1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The ``broker`` marker, by fixture: a test that takes the broker's settings needs the real broker, and only
    those do (``pytest -m "not broker"``, ``make test-fast``: the tiers that run in seconds without one)."""
    for item in items:
        if "broker_settings" in getattr(item, "fixturenames", ()):  # kafka_settings depends on it
            item.add_marker(pytest.mark.broker)
