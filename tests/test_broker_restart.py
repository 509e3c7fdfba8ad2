"""Tier 3: the broker goes away in the middle of a replay and comes back; the worker reconnects by itself and
nothing is lost or counted twice (features exact against networkx afterwards).

The broker here is a second LocalBroker of this test's own (own ports and home folder: data, config, log and
pid file all live under ``<home>/kafka``), never the session's shared one, which other tests are using.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import networkx as nx
from test_stream_features import assert_pairs_exact, assert_users_exact, sample_pairs

from conftest import EGO_FACEBOOK, REPO, free_port
from pymk.datasets import load_edge_history
from pymk.events import ConnectionEvent
from pymk.kafka_broker import LocalBroker
from pymk.settings import Settings
from pymk.streams.lag import wait_idle
from pymk.streams.producer import event_messages, send_messages
from pymk.streams.topics import ensure_topics
from workers import http_get, running_worker, wait_until

EGO = EGO_FACEBOOK
RATE = 250.0  # events/s: the 5,600 events take ~22 s, so the outage falls in the middle
OUTAGE_S = 8.0  # down for this long after the broker has exited (plus its start-up time)


def own_broker_settings(tmp_path: Path) -> Settings:
    ports = set()
    while len(ports) < 3:  # broker, controller and debug HTTP: distinct
        ports.add(free_port())
    kafka_port, controller_port, web_port = sorted(ports)
    return Settings.from_env(
        home=tmp_path / "home", kafka_port=kafka_port, kafka_controller_port=controller_port, bootstrap_servers="",
        kafka_heap_mb=512, web_port=web_port, topic_prefix="restart.pymk", app_id="restart-worker",
        recommend=False,  # features only: lists are tested elsewhere
    )


def processed(settings: Settings) -> int:
    return sum(http_get(settings, "/stats")["events_valid"].values())


def produce(settings: Settings, events: list[ConnectionEvent], rate: float, failures: list[BaseException]) -> None:
    try:
        send_messages(settings, event_messages(settings, events), len(events), rate=rate, progress=False)
    except BaseException as exc:  # noqa: BLE001 - reported by the test thread
        failures.append(exc)


def test_worker_continues_after_the_broker_restarts_mid_stream(tmp_path: Path) -> None:
    settings = own_broker_settings(tmp_path)
    broker = LocalBroker(settings)
    shared = LocalBroker(Settings.from_env(home=REPO / ".pymk"))
    assert broker.dir != shared.dir and broker.config_file != shared.config_file and broker.pid_file != shared.pid_file

    rng = random.Random(5)
    events = [ConnectionEvent(u, v, "add", ts) for u, v, ts in load_edge_history(EGO).connections[:5_000]]
    last = events[-1].ts
    removed = rng.sample(events, 300)
    events += [ConnectionEvent(e.dst, e.src, "remove", last + 1000 * (i + 1)) for i, e in enumerate(removed)]
    events += rng.sample(events, 300)  # duplicates, as at-least-once producers send
    rng.shuffle(events)  # last writer wins: the order of events does not matter
    graph = nx.Graph()
    graph.add_edges_from((e.src, e.dst) for e in events if e.action == "add")
    graph.remove_edges_from((e.src, e.dst) for e in removed)

    broker.start(timeout_s=120, quiet=True)
    try:
        ensure_topics(settings)
        log = tmp_path / "worker.log"
        with running_worker(settings, log) as worker:
            failures: list[BaseException] = []
            # A steady stream that the outage interrupts: the producer's sends wait and retry meanwhile.
            stream = threading.Thread(target=produce, args=(settings, events, RATE, failures),
                                      daemon=True)
            stream.start()
            wait_until(lambda: processed(settings) >= 1_000, 60, what="the worker under way")
            assert broker.stop(), "the test's broker was not running"
            at_stop = processed(settings)
            time.sleep(OUTAGE_S)
            assert worker.poll() is None, f"the worker exited while the broker was down (log: {log})"
            broker.start(timeout_s=120, quiet=True)

            stream.join(timeout=180)
            assert not stream.is_alive(), "the producer did not finish after the restart"
            assert not failures, f"producing failed: {failures}"
            assert at_stop < len(events), "the broker should have stopped mid-stream"
            assert wait_idle(settings, timeout_s=120), f"the worker did not catch up after the restart (log: {log})"
            assert worker.poll() is None
            assert processed(settings) >= len(events)
            assert_pairs_exact([settings], graph, sample_pairs(graph, 600, rng))
            assert_users_exact([settings], graph, rng.sample(sorted(graph), 20))
    finally:
        broker.stop()
