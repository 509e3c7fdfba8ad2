"""Tier 3: three workers on 12 partitions with the ANN index sharded by partition (PYMK_ANN_MODE=sharded) publish
the lists one replicated worker publishes on the same events, and answer ``/neighbours`` as its one index does.

Each sharded worker's HNSW graph holds its own partitions' users (about a third); Stage 1 gathers every shard's
top k over HTTP and merges them. On this small network a shard's search with ef_search ≥ its size returns its
exact top k, so the merge is the exact global top k, which is also what the single worker's one index returns:
the lists must be equal, item for item.

Run twice: with every worker holding every user's ``user-globals`` records, and with each holding only the remote
users its lists and embeddings read, fetched from their owners (PYMK_GLOBALS_MODE=reachable,
streams/remote_facts.py): the same lists either way, GraphSAGE vectors included."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from conftest import free_port
from pymk.settings import Settings
from pymk.streams.partitioning import partition_for_user
from pymk.streams.topics import ensure_topics
from stream_helpers import final_refresh, latest_lists, list_content, send, small_network, users_of
from workers import http_get, running_worker, workers_beside_a_reference

PARTITIONS = 12


@pytest.mark.parametrize("globals_mode", ["replicated", "reachable"])
def test_three_sharded_workers_publish_the_lists_of_one_replicated_worker(kafka_settings: Settings, tmp_path: Path,
                                                                         globals_mode: str) -> None:
    events = small_network(150, seed=13)
    users = users_of(events)
    base = replace(kafka_settings, partitions=PARTITIONS, reembed_min_interval_ms=1000)
    tag = "one" + base.topic_prefix
    reference = replace(base, topic_prefix=tag, app_id=tag + "-worker", home=tmp_path / "one", web_port=free_port())
    # a peer's answer is waited for longer than the default: on a loaded CI machine a peer busy with a flush may
    # take seconds, and a list built without its shard (the designed answer to a dead peer) is not the same list
    workers = [replace(base, ann_mode="sharded", ann_shard_timeout_ms=15_000, globals_mode=globals_mode,
                       globals_fetch_timeout_ms=15_000, home=tmp_path / f"worker{i}", web_port=free_port())
               for i in range(3)]

    asked = sorted(users)[:40]  # /neighbours of these, from each deployment

    def neighbours_of(settings: Settings) -> dict[int, list]:
        return {u: [(n["user"], n["cosine"]) for n in http_get(settings, f"/neighbours/{u}?k=10")["neighbours"]]
                for u in asked}

    def single_worker() -> tuple[dict, dict]:
        ensure_topics(reference)
        with running_worker(reference, tmp_path / "one.log"):
            send(reference, events)
            final_refresh(reference, [reference])
            neighbours = neighbours_of(reference)
        return {user: list_content(recs) for user, recs in latest_lists(reference).items()}, neighbours

    with workers_beside_a_reference(base, workers, tmp_path, single_worker) as (_, expected_run):
        send(base, events)
        final_refresh(base, workers)
        stats = [http_get(w, "/stats") for w in workers]
        memory = [http_get(w, "/memory") for w in workers]
        # any worker answers for any user: every shard's hits, merged (a shard alone holds about a third)
        sharded_neighbours = [neighbours_of(w) for w in workers]
        sample = http_get(workers[0], f"/neighbours/{asked[0]}?k=10")
    got = {user: list_content(recs) for user, recs in latest_lists(base).items()}
    expected, expected_neighbours = expected_run.result()
    assert sum(len(hits) == 10 for hits in expected_neighbours.values()) > len(asked) // 2
    for answers in sharded_neighbours:
        assert answers == expected_neighbours
    assert sample["ann_mode"] == "sharded" and sample["missing_partitions"] == []

    for worker_stats, worker_memory in zip(stats, memory, strict=True):
        shards = worker_stats["ann_shards"]
        # the store's arrays: 512 bytes of vector a user at least (plus its id and partition, and growth room)
        assert worker_memory["vector_store_bytes"] >= 512 * worker_stats["index"]["vector_store_users"] > 0
        assert worker_stats["index"]["ann_mode"] == "sharded"
        # the graph holds the worker's own partitions only; the vector store more (every user's, or the held ones)
        assert (worker_stats["index"]["shard_partitions"] == worker_stats["index"]["graph_partitions"]
                == worker_stats["state"]["partitions"])
        assert worker_stats["index"]["users"] < worker_stats["index"]["vector_store_users"]
        assert shards["gathers"] > 0 and shards["peer_requests"] >= 2 * shards["gathers"]
        # every gather had every shard (events were sent once the three workers held their partitions)
        assert shards["partial_searches"] == 0 and shards["peer_failures"] == 0, shards
        # a user whose vector or exclusions moved while its answer was gathered (the lock is released for the
        # gather between flushes) was not ranked from it: its list waited for the next slice's gather
        assert shards["prefetch_misses"] == worker_stats["refresh"]["not_ready"], (shards, worker_stats["refresh"])
        held = worker_stats["globals"]
        assert held["mode"] == globals_mode
        if globals_mode == "reachable":
            # the remote users' facts came from their owners, every request answered; the topic's other records
            # were dropped as read
            refresh = worker_stats["refresh"]
            waited = refresh["lists_waiting_for_facts"] + refresh["embeddings_waiting_for_facts"]
            assert held["misses"] > 0 and waited > 0, (held, refresh)  # and what waited is what one worker made
            assert held["answered_users"] > 0 and held["peer_failures"] == 0 and held["records_dropped"] > 0, held
            # the popular order from the partitions' lists (each partition's users all listed here: none cut)
            assert held["popular_order_users"] > 0 and held["popular_answers_cut"] == 0, held
            # the vectors too: the worker's partitions' users and the remote users it reads, no others
            index = worker_stats["index"]
            assert index["vectors"] == "reachable" and index["vector_records_dropped"] > 0, index
            # (on this small network every list reads nearly every user: ANN k is past its size)
            assert index["vector_store_users"] <= index["users"] + held["held_users"], (index, held)
            assert held["embeddings_merged"] > 0, held
        else:
            assert held["misses"] == 0 and held["records_dropped"] == 0
            assert worker_stats["index"]["vectors"] == "all"
    assert got.keys() == expected.keys() and len(got) > len(users) // 2
    different = sorted(user for user in got if got[user] != expected[user])
    owners = {p: i for i, worker_stats in enumerate(stats) for p in worker_stats["state"]["partitions"]}
    assert not different, {"users": len(different), "by_worker": [owners[partition_for_user(u, PARTITIONS)]
                                                                  for u in different],
                           "first": different[0] if different else None,
                           "got": got[different[0]] if different else None,
                           "expected": expected[different[0]] if different else None}
