"""Tier 3: three workers, each with its own state folder, share 12 partitions; one is SIGKILLed mid-stream and
the other two take its partitions over (re-reading them from the topics: they have no local state for them).
The end state — features, index and published lists — equals one uninterrupted worker's on the same events.

Run twice: with every worker holding every user (the defaults), and with the ANN index sharded and each worker
holding only its partitions' users and the remote users it reads (``PYMK_ANN_MODE=sharded``,
``PYMK_GLOBALS_MODE=reachable``): there the survivors also read the killed worker's partitions' vectors again
from the embeddings topic (streams/global_index.py) before their shards answer for them."""

from __future__ import annotations

import os
import signal
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import free_port
from pymk.settings import Settings
from pymk.streams.producer import send_commands
from pymk.streams.topics import ensure_topics
from stream_helpers import differences, final_refresh, send, settle, small_network, state_view, users_of
from workers import http_get, owned_partitions, running_worker, wait_until_shared, workers_beside_a_reference

PARTITIONS = 12
SESSION_TIMEOUT_S = 6.0


@pytest.mark.parametrize("deployment", ["replicated", "sharded-reachable"])
def test_three_workers_on_twelve_partitions_equal_one_and_take_over_a_killed_one(kafka_settings: Settings,
                                                                                tmp_path: Path,
                                                                                deployment: str) -> None:
    events = small_network(150, seed=13)
    users = users_of(events)
    base = replace(kafka_settings, partitions=PARTITIONS, session_timeout_s=SESSION_TIMEOUT_S,
                   reembed_min_interval_ms=1000)
    tag = "one" + base.topic_prefix
    reference = replace(base, topic_prefix=tag, app_id=tag + "-worker", home=tmp_path / "one", web_port=free_port())
    workers = [replace(base, home=tmp_path / f"worker{i}", web_port=free_port()) for i in range(3)]
    if deployment == "sharded-reachable":  # a peer's answers waited for as in tests/test_sharded_ann_workers.py
        workers = [replace(w, ann_mode="sharded", ann_shard_timeout_ms=15_000, globals_mode="reachable",
                           globals_fetch_timeout_ms=15_000) for w in workers]
    half = len(events) // 2

    def single_worker() -> dict:
        ensure_topics(reference)
        with running_worker(reference, tmp_path / "one.log"):
            send(reference, events)
            final_refresh(reference, [reference])
            return state_view([reference], users)

    with workers_beside_a_reference(base, workers, tmp_path, single_worker) as (processes, expected_run):
        send(base, events[:half])
        settle(base, workers)
        # the first owners re-embed everyone a few times: their records' versions run ahead of what a new
        # owner, replaying without their state, would number its own from
        for _ in range(3):
            send_commands(base, reembed=True, rank=False)
            settle(base, workers)
        killed = owned_partitions(workers[0])
        os.killpg(processes[0].pid, signal.SIGKILL)
        processes[0].wait()
        survivors = workers[1:]
        send(base, events[half:])
        wait_until_shared(survivors, PARTITIONS, "the two survivors own every partition", every_worker=False)
        settle(base, survivors)
        final_refresh(base, survivors)
        got = state_view(survivors, users)
        indexes = [http_get(w, "/stats")["index"] for w in survivors]
    expected = expected_run.result()

    assert len(killed) >= 2  # the killed worker held its share of the 12
    assert expected.keys() == got.keys() == users
    assert not differences(expected, got), differences(expected, got)
    assert sum(1 for view in got.values() if view["list"] is not None and view["list"]["items"]) > len(users) // 2
    if deployment == "sharded-reachable":  # the killed worker's partitions were read again by their new owners
        assert sum(index["vector_rewinds"] for index in indexes) >= len(killed), indexes
        assert all(index["graph_partitions"] == index["shard_partitions"] for index in indexes), indexes
