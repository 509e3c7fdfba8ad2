"""The ANN index sharded by partition (PYMK_ANN_MODE=sharded), without Kafka: the merge of per-shard top k, the
vector store, a GlobalIndex following its partitions, and the scatter-gather over in-process shards."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from pymk.index.ann import AnnConfig, AnnIndex, merge_top_k, merge_top_k_arrays, shard_k, truncated_shards
from pymk.index.records import EmbeddingRecord
from pymk.index.vector_store import VectorStore
from pymk.settings import Settings
from pymk.streams.ann_shards import (
    AnnNotGathered,
    ShardedAnn,
    decode_answer,
    decode_request,
    encode_answer,
    encode_request,
    search_shard,
)
from pymk.streams.global_index import GlobalIndex
from pymk.streams.partitioning import partition_for_user

DIM = 8
PARTITIONS = 12


def unit_vectors(n: int, seed: int, dim: int = DIM) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_merging_exact_shard_top_k_equals_the_global_top_k_ties_by_id() -> None:
    """Shards searched exactly (brute force), merged: the global exact top k, ties broken by id as one index does.
    Half the users share their vector with another user (exact ties), spread over different shards."""
    base = unit_vectors(60, seed=1)
    vectors = np.concatenate([base, base[:30]])  # users 60..89 tie with users 0..29
    users = np.arange(len(vectors), dtype=np.int64) * 7 + 3  # non-contiguous ids
    whole = AnnIndex(AnnConfig(dim=DIM))
    whole.upsert(users, vectors)
    shards = [AnnIndex(AnnConfig(dim=DIM)) for _ in range(3)]
    for shard_number, shard in enumerate(shards):
        mine = users % 3 == shard_number
        shard.upsert(users[mine], vectors[mine])
    for query in unit_vectors(20, seed=2):
        for k in (1, 5, 17, 90, 200):
            exclude = {int(users[0]), int(users[61])}
            expected = whole.exact_search(query, k, exclude)
            answers = [shard.exact_search(query, k, exclude) for shard in shards]
            assert merge_top_k(answers, k) == expected
            ids, scores = merge_top_k_arrays([np.array([u for u, _ in a] + [-1], np.int64) for a in answers],
                                             [np.array([x for _, x in a] + [-np.inf]) for a in answers], k)
            assert list(zip(ids.tolist(), scores.tolist(), strict=True)) == expected
    # a user answered by two shards (a partition held by both during a rebalance) counts once, at its best
    assert merge_top_k([[(5, 0.9), (2, 0.5)], [(5, 0.9), (1, 0.5)]], 3) == [(5, 0.9), (1, 0.5), (2, 0.5)]
    ids, scores = merge_top_k_arrays([np.array([5, 2]), np.array([5, 1])],
                                     [np.array([0.9, 0.5]), np.array([0.8, 0.5])], 3)
    assert ids.tolist() == [5, 1, 2] and scores.tolist() == [0.9, 0.5, 0.5]
    with pytest.raises(ValueError):
        merge_top_k([], -1)


def test_the_first_rounds_share_and_the_shards_to_ask_again() -> None:
    assert shard_k(1016, 3, 4.0) == 399  # 338.7 + 4 · 15.0
    assert shard_k(1016, 1, 4.0) == shard_k(1016, 3, 0.0) == 1016 and shard_k(10, 2, 100.0) == 10
    merged = np.array([0.9, 0.8, 0.7])
    # shard 0 was cut (3 of 3) at 0.75 ≥ the merged 3rd 0.7: asked again; shard 1 cut below it; shard 2 not cut
    assert truncated_shards([3, 3, 2], [0.75, 0.6, 0.95], 3, merged, k=3) == []  # asked == k: nothing was cut
    assert truncated_shards([2, 2, 1], [0.75, 0.6, 0.95], 2, merged, k=3) == [0]
    assert truncated_shards([2, 2], [0.7, 0.1], 2, merged, k=3) == [0]  # a tie with the k-th: its id may win
    assert truncated_shards([2, 2], [0.7, 0.1], 2, merged[:2], k=3) == [0, 1]  # fewer than k merged


def test_vector_store_reuses_rows_and_round_trips_through_its_arrays() -> None:
    store = VectorStore(DIM)
    vectors = unit_vectors(5, seed=3)
    for user in range(5):
        store.put(user * 10, vectors[user], user % 2)
    assert store.delete(20) and not store.delete(20)
    store.put(99, vectors[2], 1)  # takes the freed row
    assert len(store) == 5 and 20 not in store and 99 in store
    got = store.get_many([0, 20, 99])
    assert np.array_equal(got[0], vectors[0]) and np.isnan(got[1]).all() and np.array_equal(got[2], vectors[2])
    users, held = store.in_partitions({1})
    assert sorted(users.tolist()) == [10, 30, 99]
    again = VectorStore.from_arrays(DIM, store.arrays())
    assert sorted(again.users().tolist()) == sorted(store.users().tolist())
    assert np.array_equal(again.get_many([0, 10, 30, 40, 99]), store.get_many([0, 10, 30, 40, 99]))


def test_wire_format_round_trips_exactly() -> None:
    queries = unit_vectors(3, seed=4)
    body = encode_request(queries, 7, [{1, 2}, set(), {9}])
    got_queries, k, excludes = decode_request(body)
    assert np.array_equal(got_queries, queries) and k == 7
    assert [sorted(e.tolist()) for e in excludes] == [[1, 2], [], [9]]
    ids = np.array([[4, -1]], np.int64)
    scores = np.array([[0.123456789012345, -np.inf]])
    got_ids, got_scores, partitions = decode_answer(encode_answer(ids, scores, {3, 5}))
    assert np.array_equal(got_ids, ids) and np.array_equal(got_scores, scores) and partitions == {3, 5}


def settings(mode: str) -> Settings:
    return Settings(partitions=PARTITIONS, ann_mode=mode, ann_ef_search=256)  # type: ignore[arg-type]


def records(n: int, seed: int) -> list[EmbeddingRecord]:
    vectors = unit_vectors(n, seed, dim=128)
    return [EmbeddingRecord(user, 1, 1000, "m", vectors[user]) for user in range(n)]


def test_a_sharded_index_holds_its_partitions_follows_assignments_and_snapshots(tmp_path: Path) -> None:
    index = GlobalIndex(settings("sharded"), tmp_path / "a")
    for record in records(200, seed=5):
        index.apply(record, partition_for_user(record.user, PARTITIONS))
    # before any assignment: every vector readable, none in the graph
    assert len(index.index) == 0 and len(index.users()) == 200 and index.vector(7) is not None
    index.assign({0, 1, 2, 3})
    mine = {u for u in range(200) if partition_for_user(u, PARTITIONS) in {0, 1, 2, 3}}
    assert set(index.index.users().tolist()) == mine
    index.assign({3, 4})  # a rebalance: 0-2 revoked, 4 assigned
    mine = {u for u in range(200) if partition_for_user(u, PARTITIONS) in {3, 4}}
    assert set(index.index.users().tolist()) == mine
    deleted = next(iter(mine))
    index.apply(EmbeddingRecord(deleted, 2, 2000, "m", np.empty(0, np.float32)))
    assert deleted not in index and deleted not in index.index
    index.offsets = {p: 10 for p in range(PARTITIONS)}
    index.snapshot()
    again = GlobalIndex(settings("sharded"), tmp_path / "a")
    assert again.offsets == index.offsets and sorted(again.users()) == sorted(index.users())
    assert set(again.index.users().tolist()) == mine - {deleted}
    # the same snapshot read by a replicated worker: every vector back in its graph
    replicated = GlobalIndex(settings("replicated"), tmp_path / "a")
    assert len(replicated.index) == 199 and replicated.store is None


def test_scatter_gather_over_three_shards_equals_one_replicated_index_and_survives_a_dead_peer(
        tmp_path: Path) -> None:
    """Three workers' shards (4 partitions each) answer through the wire format; the merged answer equals one
    replicated index's search (ef_search ≥ shard size: each shard's search is exact). A peer that fails:
    the answer comes from the others, and the stats say which partitions were missing."""
    events = records(240, seed=6)
    one = GlobalIndex(settings("replicated"), tmp_path / "one")
    workers = [GlobalIndex(settings("sharded"), tmp_path / f"w{i}") for i in range(3)]
    for record in events:
        one.apply(record)
        for worker in workers:
            worker.apply(record, partition_for_user(record.user, PARTITIONS))
    for i, worker in enumerate(workers):
        worker.assign({p for p in range(PARTITIONS) if p % 3 == i})
    dead: set[str] = set()

    async def post(url: str, body: bytes, timeout_s: float) -> bytes:
        peer = int(url.split("/")[2])
        if str(peer) in dead:
            raise TimeoutError("no answer")
        queries, k, excludes = decode_request(body)
        ids, scores = await search_shard(workers[peer].index, queries, k, excludes)
        return encode_answer(ids, scores, workers[peer].graph_partitions)

    client = ShardedAnn(workers[0], PARTITIONS, lambda: ["http://1", "http://2"], post, timeout_s=1.0)
    # a first round asking each shard for its share k/3 plus half a standard deviation: often cut short, so the
    # second round (the full k of the shards whose cut may hide a top-k user) is exercised
    narrow = ShardedAnn(workers[0], PARTITIONS, lambda: ["http://1", "http://2"], post, timeout_s=1.0, sigmas=0.5)
    wanted = [(user, frozenset({(user + 1) % 240, (user + 7) % 240})) for user in range(0, 240, 17)]

    async def gather(k: int, sharded: ShardedAnn = client) -> None:
        await sharded.prefetch(wanted, k)

    for k in (5, 50, 300):
        for sharded in (client, narrow):
            asyncio.run(gather(k, sharded))
            for user, exclude in wanted:
                assert sharded.ann(user, k, exclude) == one.neighbours(user, k, set(exclude)), (user, k)
                assert sharded.ann(user, min(k, 3), exclude) == one.neighbours(user, min(k, 3), set(exclude))
    assert client.stats.partial_searches == 0 and client.stats.prefetch_misses == 0
    assert client.stats.second_rounds == 0 and client.stats.shard_k == 300
    assert narrow.stats.second_rounds > 0 and narrow.stats.queries_asked_again > 0
    assert narrow.stats.partial_searches == 0 and narrow.stats.prefetch_misses == 0
    # asked with more exclusions than gathered: the gathered answer, filtered; a user not gathered, or asked with
    # fewer exclusions (one the gather left out may be in the top k): no answer, the list waits (not the local
    # shard's third of the users)
    user, exclude = wanted[0]
    grown = set(exclude) | {one.neighbours(user, 1, set(exclude))[0][0]}
    assert client.ann(user, 5, grown) == one.neighbours(user, 5, grown)
    with pytest.raises(AnnNotGathered):
        client.ann(1, 5, ())
    with pytest.raises(AnnNotGathered):
        client.ann(user, 5, set(list(exclude)[:1]))
    assert client.stats.prefetch_misses == 2
    # the user's vector moved after the gather (re-embedded while it was awaited): its answer no longer holds
    moved = EmbeddingRecord(user, 2, 2000, "m", unit_vectors(1, 99, dim=128)[0])
    workers[0].apply(moved, partition_for_user(user, PARTITIONS))
    with pytest.raises(AnnNotGathered):
        client.ann(user, 5, exclude)
    one.apply(moved)
    asyncio.run(gather(300))
    assert client.ann(user, 5, exclude) == one.neighbours(user, 5, set(exclude))
    dead.add("2")
    asyncio.run(gather(50))
    assert client.stats.partial_searches == 1 and client.stats.peer_failures == 1
    assert client.stats.missing_partitions == tuple(p for p in range(PARTITIONS) if p % 3 == 2)
    user, exclude = wanted[0]
    alive = {u for u in range(240) if partition_for_user(u, PARTITIONS) % 3 != 2}
    assert client.ann(user, 50, exclude) == [hit for hit in one.neighbours(user, 240, set(exclude))
                                             if hit[0] in alive][:50]


def test_a_rebalance_fills_the_shard_in_chunks_between_which_the_loop_runs(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """In a worker (an event loop runs), a newly assigned partition's users go into the graph a chunk at a time;
    the shard answers for the new partitions only once they are all in; a deletion read meanwhile stays deleted;
    a newer assignment replaces an unfinished fill."""
    import pymk.streams.global_index as global_index

    monkeypatch.setattr(global_index, "ASSIGN_CHUNK", 8)
    index = GlobalIndex(settings("sharded"), tmp_path / "fill")
    for record in records(200, seed=7):
        index.apply(record, partition_for_user(record.user, PARTITIONS))
    first = {u for u in range(200) if partition_for_user(u, PARTITIONS) in {0, 1, 2}}
    second = {u for u in range(200) if partition_for_user(u, PARTITIONS) in {2, 3}}
    ticks: list[int] = []

    async def scenario() -> None:
        async def tick() -> None:
            while True:
                ticks.append(len(index.index))
                await asyncio.sleep(0)

        ticker = asyncio.get_running_loop().create_task(tick())
        index.assign({0, 1, 2})
        assert index.graph_partitions == set() and len(index.index) < len(first)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        index.assign({2, 3})  # before the first fill is done
        deleted = sorted(second)[-1]
        index.apply(EmbeddingRecord(deleted, 2, 2000, "m", np.empty(0, np.float32)))
        while index.graph_partitions != {2, 3}:
            await asyncio.sleep(0)
        ticker.cancel()
        assert set(index.index.users().tolist()) == second - {deleted}

    asyncio.run(scenario())
    assert len(set(ticks)) > 3  # the loop ran between chunks: the ticker saw the graph grow step by step


def test_a_slice_ranks_only_the_users_whose_answers_were_gathered_in_the_lanes_order(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The prefetch asks for the next ann_shard_batch owed users in the order refresh_due serves them (the stale
    lane's share, the fresh lane, the rest of the stale one); refresh_due then ranks those and leaves the others
    owed for the next slice, none dropped."""
    from test_refresh_policy import STALE_MS, CountingRefresher, owed_state

    import pymk.streams.refresh as refresh

    monkeypatch.setattr(refresh, "default_filters", lambda config: ())  # no graph in the fake state: no exclusions

    class GatheredShards:
        def __init__(self) -> None:
            self.ready: dict[int, object] = {}
            self.asked: list[list[int]] = []

        async def gather(self, wanted: list[tuple[int, frozenset[int]]], k: int) -> dict[int, object]:
            self.asked.append([user for user, _ in wanted])
            return {user: object() for user, _ in wanted}

        def clear(self) -> None:
            self.ready = {}

    now = 10_000_000
    state = owed_state(now)  # users 0..9 fresh (0 newest), 99 stale
    state.graph = state.behaviour = None  # type: ignore[attr-defined]
    state.event_time_ms = now  # type: ignore[attr-defined]
    settings_ = Settings(refresh_max_staleness_ms=STALE_MS, refresh_stale_share=0.5, ann_shard_batch=4)
    refresher = CountingRefresher(settings_, cost_s=0.0)
    refresher.tower_index = None
    refresher.index = refresher.degree_of = refresher.profile_of = None  # type: ignore[assignment]
    refresher.activity_of = refresher.most_active_of = None  # type: ignore[assignment]
    refresher.candidates = refresh.candidate_config(settings_)
    refresher.shards = GatheredShards()  # type: ignore[assignment]
    slices = 0
    while state.work.refreshes():
        asyncio.run(refresher.prefetch_ann([state], now))  # type: ignore[list-item]
        refresher.refresh_due([state], now, budget_s=10.0)  # type: ignore[list-item]
        slices += 1
        assert slices < 10
    assert refresher.shards.asked[0] == [99, 0, 1, 2]  # type: ignore[union-attr]
    assert refresher.ranked == [99, *range(10)] and slices == 3  # 4 a slice, in the lanes' order


def test_pymk_bench_ann_shards_prints_the_scatter_gather_against_one_index(capsys: pytest.CaptureFixture[str]
                                                                           ) -> None:
    import json

    from pymk.cli import main

    assert main(["bench", "ann-shards", "--users", "1200", "--shards", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["shards"] == 2 and report["n"] == 1200 and report["peers"] == 1
    assert set(report["per_batch"]) == {"replicated", "local_shard", "scatter_gather"}
    assert report["shard_stats"]["peer_failures"] == 0 and report["shard_stats"]["missing_partitions"] == []
    # both are HNSW answers checked against the exact top k; merging shards must not lose what one index finds
    assert report["recall_at_k"]["sharded"] >= report["recall_at_k"]["replicated"] - 0.01
