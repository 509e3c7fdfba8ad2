"""Tier 1: the partitioned graph state is exact after any sequence of events, any delivery order, any
duplicates — compared with networkx on the last-writer-wins graph."""

from __future__ import annotations

import math
import random
from pathlib import Path

import networkx as nx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pymk.features.graph import PartitionGraph, adamic_adar_weight, edge_version
from pymk.features.storage import DictRowStore, RocksRowStore
from support.clusters import GraphCluster


def lww_graph(events: list[tuple[int, int, str, int]]) -> nx.Graph:
    best: dict[tuple[int, int], int] = {}
    for src, dst, action, ts in events:
        pair = (min(src, dst), max(src, dst))
        best[pair] = max(best.get(pair, -1), edge_version(ts, action))
    graph = nx.Graph()
    graph.add_edges_from(pair for pair, version in best.items() if version % 2 == 0)
    return graph


def assert_exact(cluster: GraphCluster, oracle: nx.Graph, users: range) -> None:
    for u in users:
        graph = cluster.graphs[cluster.part(u)]
        truth = set(oracle[u]) if u in oracle else set()
        assert set(graph.neighbours(u)) == truth
        assert graph.degree(u) == len(truth)
        assert cluster.degrees.get(u, (0, 0))[0] == len(truth)
        counts, scores = graph.two_hop_scores(u)
        expected_counts: dict[int, int] = {}
        for v in users:
            if v == u or u not in oracle or v not in oracle:
                continue
            common = set(nx.common_neighbors(oracle, u, v))
            if common:
                expected_counts[v] = len(common)
                expected_aa = sum(adamic_adar_weight(oracle.degree(z)) for z in common)
                assert math.isclose(graph.adamic_adar_score(u, v), expected_aa, rel_tol=1e-9)
                assert math.isclose(scores[v], expected_aa, rel_tol=1e-9)
                assert graph.common_neighbors(u, v) == sorted(common)
        assert graph.common_neighbor_counts(u) == expected_counts
        assert counts == expected_counts


event_lists = st.lists(
    st.tuples(st.integers(0, 11), st.integers(0, 11), st.sampled_from(["add", "add", "remove"]),
              st.integers(0, 30)).filter(lambda e: e[0] != e[1]),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(events=event_lists, partitions=st.integers(1, 4), seed=st.integers(0, 10**6))
def test_exact_after_any_events_and_any_delivery_order(events, partitions, seed) -> None:
    rng = random.Random(seed)
    cluster = GraphCluster(partitions, rng)
    for src, dst, action, ts in events:
        cluster.connection(src, dst, action, ts)
        if rng.random() < 0.5:
            cluster.deliver_some(rng.random())
    cluster.drain()
    assert_exact(cluster, lww_graph(events), range(12))


@settings(max_examples=50, deadline=None)
@given(events=event_lists, seed=st.integers(0, 10**6))
def test_replaying_everything_again_changes_nothing(events, seed) -> None:
    cluster = GraphCluster(3, random.Random(seed))
    for event in events:
        cluster.connection(*event)
    cluster.drain()
    before = cluster.all_counts(range(12))
    for event in reversed(events):  # duplicates, in another order
        cluster.connection(*event)
    cluster.drain()
    assert cluster.all_counts(range(12)) == before


def test_remove_then_readd_restores_features() -> None:
    cluster = GraphCluster(2, random.Random(1))
    edges = [(0, 1), (1, 2), (2, 3), (0, 3), (1, 3)]
    for i, (a, b) in enumerate(edges):
        cluster.connection(a, b, "add", i)
    cluster.drain()
    snapshot = [(cluster.owner(u).common_neighbor_counts(u), cluster.owner(u).two_hop_scores(u)[1]) for u in range(4)]
    cluster.connection(1, 3, "remove", 10)
    cluster.drain()
    assert cluster.graphs[cluster.part(0)].common_neighbor_count(0, 2)[0] == 2 - 0  # via 1 and 3, unchanged
    cluster.connection(3, 1, "add", 11)
    cluster.drain()
    assert [(cluster.owner(u).common_neighbor_counts(u), cluster.owner(u).two_hop_scores(u)[1])
            for u in range(4)] == snapshot


def test_older_event_arriving_late_loses() -> None:
    cluster = GraphCluster(2, random.Random(2))
    cluster.connection(0, 1, "remove", 20)
    cluster.connection(1, 0, "add", 10)  # older than the remove
    cluster.connection(1, 2, "add", 5)
    cluster.drain()
    assert cluster.graphs[cluster.part(0)].neighbours(0) == {}
    assert cluster.graphs[cluster.part(0)].common_neighbor_count(0, 2) == (0, None)


def test_state_survives_flush_and_reload_from_rocksdb(tmp_path: Path) -> None:
    rng = random.Random(3)
    stores = {p: RocksRowStore(tmp_path / f"p{p}") for p in range(3)}
    cluster = GraphCluster(3, rng, store_factory=lambda p: stores[p])
    events = [(rng.randrange(30), rng.randrange(30), "add", t) for t in range(200)]
    events = [e for e in events if e[0] != e[1]]
    for event in events:
        cluster.connection(*event)
    cluster.drain()
    for graph in cluster.graphs:
        graph.flush()
        graph.store.close()
    reopened = [PartitionGraph(p, 3, RocksRowStore(tmp_path / f"p{p}"), cluster.part) for p in range(3)]
    cluster.graphs = reopened
    assert_exact(cluster, lww_graph(events), range(30))
    for graph in reopened:
        graph.store.close()


def test_counts_carry_the_timestamp_of_the_last_change() -> None:
    cluster = GraphCluster(1, random.Random(4))
    cluster.connection(0, 1, "add", 100)
    cluster.connection(1, 2, "add", 200)
    cluster.drain()
    assert cluster.graphs[0].common_neighbor_count(0, 2) == (1, 200)


def test_reading_a_user_of_another_partition_fails_loudly() -> None:
    from pymk.features.graph import OwnershipError

    cluster = GraphCluster(2, random.Random(5))
    cluster.connection(0, 1, "add", 1)
    cluster.drain()
    remote = next(u for u in range(100) if cluster.part(u) == 1)
    graph = cluster.graphs[0]
    with pytest.raises(OwnershipError):
        graph.neighbours(remote)
    with pytest.raises(OwnershipError):
        graph.common_neighbor_counts(remote)


def test_float_features_are_bit_identical_whatever_the_arrival_order() -> None:
    """Adamic-Adar and resource allocation are sums of floats: the same graph must give the same bits however
    its registers arrived (timing between partitions, a replay after a crash), or lists ranked on them differ."""
    rng = random.Random(6)
    events = [(rng.randrange(40), rng.randrange(40), rng.choice(["add", "add", "remove"]), rng.randrange(500))
              for _ in range(600)]
    events = [e for e in events if e[0] != e[1]]
    answers = []
    for seed in range(3):
        order = list(events)
        random.Random(seed).shuffle(order)
        cluster = GraphCluster(3, random.Random(seed))
        for event in order:
            cluster.connection(*event)
            cluster.deliver_some(0.3)
        cluster.drain()
        answers.append([cluster.owner(u).two_hop_with_allocation(u) for u in range(40)])
        for u in range(40):  # the pair reading and the all-candidates reading agree to the bit too
            _, scores = cluster.owner(u).two_hop_scores(u)
            assert all(cluster.owner(u).adamic_adar_score(u, v) == score for v, score in scores.items())
    assert answers[0] == answers[1] == answers[2]


def test_changed_users_are_taken_once_and_seen_again_after_a_new_change() -> None:
    """The refresher takes the changed users (Refresher.collect) possibly several times between two flushes: a
    take returns what changed since the previous take, whatever was made durable, and a user changed again
    after a take is returned again (its list must answer that change too)."""
    graph = PartitionGraph(0, 1, DictRowStore(), lambda user: 0)
    graph.apply_connection(1, 2, "add", 10)
    assert graph.take_changed_users()[0] == {1, 2}
    assert graph.take_changed_users() == (set(), set())  # nothing new, though nothing was flushed either
    graph.apply_connection(2, 3, "add", 20)
    own, two_hop = graph.take_changed_users()
    assert own == {2, 3} and two_hop == {1, 3}  # 1 and 3 are now 2 hops apart
    graph.apply_connection(2, 3, "add", 20)  # a duplicate changes nothing
    assert graph.take_changed_users() == (set(), set())
    graph.flush()
    graph.apply_connection(1, 2, "remove", 30)
    assert graph.take_changed_users()[0] == {1, 2}
