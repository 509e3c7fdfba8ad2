"""Test session set-up: the real Kafka broker, and per-test isolated settings.

The session starts the local broker when none is listening and stops only what it started. The suite runs in
parallel (pytest-xdist, ``make test``): whichever worker process first needs the broker starts it under a file lock
and leaves a marker named after the run; the controlling process stops it when the whole run is over, so no worker
stops it under another's tests. Tests that
talk to Kafka take the ``kafka_settings`` fixture: settings with a topic prefix, consumer group and web
port of their own, so tests never see each other's messages. There is no skip when the broker is missing:
a broker that cannot start fails the tests that need it.
"""

from __future__ import annotations

import fcntl
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


_RUN_ENV = "PYMK_TEST_RUN"  # one id for the controlling process and every worker of a run (inherited)


def _settings() -> Settings:
    return Settings.from_env(home=REPO / ".pymk")


def _started_marker(settings: Settings) -> Path:
    return Path(settings.home) / f"broker.started-by-{os.environ[_RUN_ENV]}"


def pytest_configure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput"):  # the controlling process (or a run without xdist): before any worker
        os.environ.setdefault(_RUN_ENV, uuid.uuid4().hex[:12])


def pytest_unconfigure(config: pytest.Config) -> None:
    """The run is over (every worker finished): stop the broker if one of its processes started it."""
    if hasattr(config, "workerinput") or _RUN_ENV not in os.environ:
        return
    settings = _settings()
    marker = _started_marker(settings)
    if marker.exists():
        marker.unlink()
        if not os.environ.get("PYMK_KEEP_BROKER"):
            LocalBroker(settings).stop()


@pytest.fixture(scope="session")
def broker_settings() -> Settings:
    """Settings of the session's broker (the default local one, under the repo's .pymk folder)."""
    settings = _settings()
    Path(settings.home).mkdir(parents=True, exist_ok=True)
    # Two workers may both find no broker at once: one starts it, the other waits on the lock and finds it up.
    with open(Path(settings.home) / "broker.start.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        broker = LocalBroker(settings)
        if not broker.accepting():
            broker.start()
            _started_marker(settings).touch()
    return settings


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
    broker_files = set()
    for item in items:
        if "broker_settings" in getattr(item, "fixturenames", ()):  # kafka_settings depends on it
            item.add_marker(pytest.mark.broker)
            broker_files.add(item.path)
    # The broker's files first: they hold the long tests, and xdist hands out whole files in this order
    # (--dist loadfile), so the short files fill the end of the run instead of one long file running alone.
    items.sort(key=lambda item: item.path not in broker_files)
