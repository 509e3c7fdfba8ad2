"""Tier 3: SIGKILL of the worker in the middle of a replay, several times; after restarts every feature is
exact — nothing lost, nothing counted twice (idempotent merges + the commit order of streams/state.py)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import networkx as nx
from test_stream_features import assert_pairs_exact, assert_users_exact, sample_pairs

from conftest import EGO_FACEBOOK
from pymk.datasets import load_edge_history
from pymk.events import ConnectionEvent
from pymk.processes import start_worker_process, stop_process
from pymk.settings import Settings
from pymk.streams.lag import wait_idle
from pymk.streams.producer import event_messages, send_messages
from pymk.streams.topics import ensure_topics
from workers import http_get, wait_until


def start_worker(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    proc = start_worker_process(settings, log)
    wait_until(lambda: proc.poll() is None and http_get(settings, "/health")["status"] == "ok", 90,
               what=f"worker ready (log {log})")
    return proc


def test_sigkill_during_replay_loses_and_duplicates_nothing(kafka_settings: Settings, tmp_path: Path) -> None:
    kafka_settings = replace(kafka_settings, recommend=False)  # features; lists and the index: test_stream_index
    history = load_edge_history(EGO_FACEBOOK)
    rng = random.Random(11)
    # 25,000 edges, with some removals and duplicate events mixed in
    events = [ConnectionEvent(u, v, "add", ts) for u, v, ts in history.connections[:25_000]]
    last = events[-1].ts
    removed = rng.sample(events[:20_000], 500)
    events += [ConnectionEvent(e.dst, e.src, "remove", last + 1000 * (i + 1)) for i, e in enumerate(removed)]
    events += rng.sample(events, 2_000)  # at-least-once producers: duplicates
    graph = nx.Graph()
    graph.add_edges_from((e.src, e.dst) for e in events if e.action == "add")
    graph.remove_edges_from((e.src, e.dst) for e in removed)

    ensure_topics(kafka_settings)
    chunks = [events[i::5] for i in range(5)]
    log = tmp_path / "worker.log"
    proc = start_worker(kafka_settings, log)
    for kill in range(5):
        send_messages(kafka_settings, event_messages(kafka_settings, chunks[kill]), len(chunks[kill]), progress=False)
        time.sleep(rng.uniform(1.0, 4.0))  # somewhere in the middle of processing that chunk
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc = start_worker(kafka_settings, log)
    try:
        assert wait_idle(kafka_settings, timeout_s=600), "the worker did not catch up after the restarts"
        assert_pairs_exact([kafka_settings], graph, sample_pairs(graph, 1000, rng))
        assert_users_exact([kafka_settings], graph, rng.sample(sorted(graph), 20))
    finally:
        stop_process(proc)
