"""Tier 3: three workers on 12 partitions with the ANN index sharded by partition (PYMK_ANN_MODE=sharded) publish
the lists one replicated worker publishes on the same events.

Each sharded worker's HNSW graph holds its own partitions' users (about a third); Stage 1 gathers every shard's
top k over HTTP and merges them. On this small network a shard's search with ef_search ≥ its size returns its
exact top k, so the merge is the exact global top k, which is also what the single worker's one index returns:
the lists must be equal, item for item."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from conftest import free_port
from pymk.settings import Settings
from pymk.streams.partitioning import partition_for_user
from pymk.streams.topics import ensure_topics
from stream_helpers import final_refresh, latest_lists, list_content, send, small_network, users_of
from workers import http_get, running_worker, workers_beside_a_reference

PARTITIONS = 12


def test_three_sharded_workers_publish_the_lists_of_one_replicated_worker(kafka_settings: Settings,
                                                                         tmp_path: Path) -> None:
    events = small_network(150, seed=13)
    users = users_of(events)
    base = replace(kafka_settings, partitions=PARTITIONS, reembed_min_interval_ms=1000)
    tag = "one" + base.topic_prefix
    reference = replace(base, topic_prefix=tag, app_id=tag + "-worker", home=tmp_path / "one", web_port=free_port())
    # a peer's answer is waited for longer than the default: on a loaded CI machine a peer busy with a flush may
    # take seconds, and a list built without its shard (the designed answer to a dead peer) is not the same list
    workers = [replace(base, ann_mode="sharded", ann_shard_timeout_ms=15_000, home=tmp_path / f"worker{i}",
                       web_port=free_port()) for i in range(3)]

    def single_worker() -> dict:
        ensure_topics(reference)
        with running_worker(reference, tmp_path / "one.log"):
            send(reference, events)
            final_refresh(reference, [reference])
        return {user: list_content(recs) for user, recs in latest_lists(reference).items()}

    with workers_beside_a_reference(base, workers, tmp_path, single_worker) as (_, expected_run):
        send(base, events)
        final_refresh(base, workers)
        stats = [http_get(w, "/stats") for w in workers]
    got = {user: list_content(recs) for user, recs in latest_lists(base).items()}
    expected = expected_run.result()

    for worker_stats in stats:
        shards = worker_stats["ann_shards"]
        assert worker_stats["index"]["ann_mode"] == "sharded"
        # the graph holds the worker's own partitions only; the vector store every user with a vector
        assert (worker_stats["index"]["shard_partitions"] == worker_stats["index"]["graph_partitions"]
                == worker_stats["state"]["partitions"])
        assert worker_stats["index"]["users"] < worker_stats["index"]["vector_store_users"]
        assert shards["gathers"] > 0 and shards["peer_requests"] >= 2 * shards["gathers"]
        # every gather had every shard (events were sent once the three workers held their partitions)
        assert shards["partial_searches"] == 0 and shards["peer_failures"] == 0, shards
        assert shards["prefetch_misses"] == 0, shards
    assert got.keys() == expected.keys() and len(got) > len(users) // 2
    different = sorted(user for user in got if got[user] != expected[user])
    owners = {p: i for i, worker_stats in enumerate(stats) for p in worker_stats["state"]["partitions"]}
    assert not different, {"users": len(different), "by_worker": [owners[partition_for_user(u, PARTITIONS)]
                                                                  for u in different],
                           "first": different[0] if different else None,
                           "got": got[different[0]] if different else None,
                           "expected": expected[different[0]] if different else None}
