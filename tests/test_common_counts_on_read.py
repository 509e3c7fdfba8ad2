"""Tier 1: common-neighbour counts read on demand (PYMK_COMMON_COUNTS=on-read) equal the materialised rows after
any events in any delivery order, mark the same users as 2-hop changed, keep no C rows, and a partition converts
when opened in the other mode."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st
from test_graph_state import assert_exact, event_lists, lww_graph

from pymk.features.graph import PartitionGraph
from pymk.features.keyspace import COMMON, GRAPH_MODE
from pymk.features.storage import DictRowStore
from support.clusters import GraphCluster


def _run(events: list[tuple[int, int, str, int]], partitions: int, seed: int,
         materialise_common: bool) -> tuple[GraphCluster, list[tuple[set[int], set[int]]]]:
    rng = random.Random(seed)
    cluster = GraphCluster(partitions, rng, materialise_common=materialise_common)
    marks = []
    for src, dst, action, ts in events:
        cluster.connection(src, dst, action, ts)
        if rng.random() < 0.5:
            cluster.deliver_some(rng.random())
        changed = [graph.take_changed_users() for graph in cluster.graphs]
        marks.append((set().union(*(own for own, _ in changed)), set().union(*(two for _, two in changed))))
    cluster.drain()
    changed = [graph.take_changed_users() for graph in cluster.graphs]
    marks.append((set().union(*(own for own, _ in changed)), set().union(*(two for _, two in changed))))
    return cluster, marks


@settings(max_examples=150, deadline=None)
@given(events=event_lists, partitions=st.integers(1, 4), seed=st.integers(0, 10**6))
def test_counts_on_read_are_exact_and_mark_the_same_users(events, partitions, seed) -> None:
    on_read, on_read_marks = _run(events, partitions, seed, materialise_common=False)
    materialised, materialised_marks = _run(events, partitions, seed, materialise_common=True)
    assert_exact(on_read, lww_graph(events), range(12))
    assert on_read_marks == materialised_marks  # the same delivery order (same seed): the same users, each step
    for u in range(12):
        for v in range(12):
            assert (on_read.owner(u).common_neighbor_count(u, v)[0]
                    == materialised.owner(u).common_neighbor_count(u, v)[0])
    for graph in on_read.graphs:
        puts, deletes = graph.dirty_rows()
        assert not any(key[:1] == COMMON for key in [*puts, *deletes])
        assert graph.stats.pair_updates == 0
    assert (sum(g.stats.two_hop_marks for g in on_read.graphs)
            == sum(g.stats.pair_updates for g in materialised.graphs))


@settings(max_examples=60, deadline=None)
@given(edges=st.lists(st.tuples(st.integers(0, 9), st.integers(0, 9)).filter(lambda e: e[0] != e[1]), max_size=40),
       partitions=st.integers(1, 3))
def test_the_timestamp_is_exact_while_edges_are_only_added_in_time_order(edges, partitions) -> None:
    clusters = [GraphCluster(partitions, random.Random(0), materialise_common=mode) for mode in (True, False)]
    # each edge once: a repeated add of a live edge moves its register (re-dating the paths read on demand) but
    # not the materialised count
    edges = list({(min(a, b), max(a, b)): (a, b) for a, b in edges}.values())
    for ts, (a, b) in enumerate(edges):
        for cluster in clusters:
            cluster.connection(a, b, "add", 10 * (ts + 1))
            cluster.drain()
    materialised, on_read = clusters
    for u in range(10):
        for v in range(10):
            assert on_read.owner(u).common_neighbor_count(u, v) == materialised.owner(u).common_neighbor_count(u, v)


def test_after_a_removal_the_timestamp_dates_the_newest_remaining_path() -> None:
    graph = PartitionGraph(0, 1, DictRowStore(), lambda user: 0, materialise_common=False)
    for ts, (a, b) in enumerate([(0, 1), (1, 2), (0, 3), (3, 2)], start=1):
        graph.apply_connection(a, b, "add", 100 * ts)
    assert graph.common_neighbor_count(0, 2) == (2, 400)
    graph.apply_connection(3, 2, "remove", 500)
    assert graph.common_neighbor_count(0, 2) == (1, 200)  # materialised would say 500: no history is kept
    assert graph.common_neighbor_count(0, 0) == (0, None)
    assert graph.common_neighbor_counts(0) == {2: 1}


def _graph(store: DictRowStore, materialise_common: bool) -> PartitionGraph:
    graph = PartitionGraph(0, 1, store, lambda user: 0, materialise_common=materialise_common)
    graph.reconcile_common_rows()
    return graph


def test_a_partition_converts_between_the_modes_both_ways() -> None:
    rng = random.Random(7)
    events = [(rng.randrange(25), rng.randrange(25), "add", t) for t in range(150)]
    store = DictRowStore()
    graph = _graph(store, materialise_common=True)
    for src, dst, action, ts in events:
        if src != dst:
            graph.apply_connection(src, dst, action, ts)
    graph.flush()
    counts = {u: graph.common_neighbor_counts(u) for u in range(25)}
    assert any(True for _ in store.scan(COMMON))
    assert store.get(GRAPH_MODE) == b"materialised"

    on_read = PartitionGraph(0, 1, store, lambda user: 0, materialise_common=False)
    assert on_read.reconcile_common_rows() is not None
    assert not any(True for _ in store.scan(COMMON)) and store.get(GRAPH_MODE) == b"on-read"
    assert {u: on_read.common_neighbor_counts(u) for u in range(25)} == counts
    assert on_read.reconcile_common_rows() is None  # the same mode again: nothing to do

    back = PartitionGraph(0, 1, store, lambda user: 0, materialise_common=True)
    assert back.reconcile_common_rows() is not None
    assert store.get(GRAPH_MODE) == b"materialised"
    assert {u: back.common_neighbor_counts(u) for u in range(25)} == counts
    for u in range(25):
        for v in range(25):
            assert back.common_neighbor_count(u, v) == on_read.common_neighbor_count(u, v)


def test_a_store_from_before_the_mode_key_is_taken_as_materialised() -> None:
    store = DictRowStore()
    old = PartitionGraph(0, 1, store, lambda user: 0)
    old.apply_connection(1, 2, "add", 1)
    old.apply_connection(2, 3, "add", 2)
    old.flush()
    assert store.get(GRAPH_MODE) is None
    graph = PartitionGraph(0, 1, store, lambda user: 0)
    assert graph.reconcile_common_rows() is None
    assert graph.common_neighbor_count(1, 3) == (1, 2) and store.get(GRAPH_MODE) == b"materialised"


def test_a_worker_partition_opened_in_the_other_mode_converts_in_rocksdb(tmp_path) -> None:
    from pymk.features.pair import graph_pair_features
    from pymk.streams.state import PartitionState

    state = PartitionState.open(0, 1, tmp_path / "p0", lambda user: 0)
    for ts, (a, b) in enumerate([(1, 2), (2, 3), (3, 4), (1, 4), (4, 5)], start=1):
        state.graph.apply_connection(a, b, "add", 1000 * ts)
    state.graph.flush()
    before = {u: state.graph.common_neighbor_counts(u) for u in range(1, 6)}
    pair = graph_pair_features(state.graph, 1, 3, lambda v: (state.graph.degree(v), None))
    state.store.close()

    state = PartitionState.open(0, 1, tmp_path / "p0", lambda user: 0, materialise_common=False)
    assert not any(True for _ in state.store.scan(COMMON))
    assert {u: state.graph.common_neighbor_counts(u) for u in range(1, 6)} == before
    assert graph_pair_features(state.graph, 1, 3, lambda v: (state.graph.degree(v), None)) == pair
    state.graph.apply_connection(3, 5, "add", 9000)  # the count of (1, 5) read on demand follows
    assert state.graph.common_neighbor_count(1, 5) == (1, 5000)
    assert state.graph.common_neighbor_count(2, 5) == (1, 9000)
    state.store.close()


# ---- hubs (PYMK_HUB_DEGREE): no 2-path through a user of more neighbours than the cap ---------------------------
def _hub_oracle(oracle, u: int, hub_degree: int) -> dict[int, list[int]]:
    """candidate → its common neighbours with u that are not hubs."""
    found: dict[int, list[int]] = {}
    if u not in oracle:
        return found
    for z in oracle[u]:
        if oracle.degree(z) > hub_degree:
            continue
        for w in oracle[z]:
            if w != u:
                found.setdefault(w, []).append(z)
    return {w: sorted(zs) for w, zs in found.items()}


@settings(max_examples=120, deadline=None)
@given(events=event_lists, partitions=st.integers(1, 4), seed=st.integers(0, 10**6), hub_degree=st.integers(1, 4))
def test_no_two_path_runs_through_a_hub_and_every_changed_user_is_marked(events, partitions, seed,
                                                                         hub_degree) -> None:
    import math

    from pymk.features.graph import adamic_adar_weight

    rng = random.Random(seed)
    cluster = GraphCluster(partitions, rng, materialise_common=False, hub_degree=hub_degree)
    seen: list[tuple[int, int, str, int]] = []

    def snapshot() -> dict[int, tuple]:
        out = {}
        for u in range(12):
            found = cluster.owner(u).two_hop_arrays(u)
            out[u] = (found.ids.tolist(), found.counts.tolist(), found.adamic_adar.tolist())
        return out

    before = snapshot()
    for event in events:
        seen.append(event)
        cluster.connection(*event)
        cluster.drain()  # converged after each event: what it changed is then compared with what it marked
        changed = [graph.take_changed_users() for graph in cluster.graphs]
        marked = set().union(*(own | two for own, two in changed))
        after = snapshot()
        assert {u for u in range(12) if after[u] != before[u]} <= marked
        before = after
    oracle = lww_graph(seen)
    for u in range(12):
        graph = cluster.owner(u)
        expected = _hub_oracle(oracle, u, hub_degree)
        assert graph.common_neighbor_counts(u) == {w: len(zs) for w, zs in expected.items()}
        counts, scores = graph.two_hop_scores(u)
        assert counts == {w: len(zs) for w, zs in expected.items()}
        for w, zs in expected.items():
            assert graph.common_neighbors(u, w) == zs
            assert graph.common_neighbor_count(u, w)[0] == len(zs)
            assert math.isclose(scores[w], sum(adamic_adar_weight(oracle.degree(z)) for z in zs), rel_tol=1e-9)


def test_a_hub_needs_counts_on_read() -> None:
    import pytest

    with pytest.raises(ValueError, match="PYMK_COMMON_COUNTS=on-read"):
        PartitionGraph(0, 1, DictRowStore(), lambda user: 0, hub_degree=100)


def test_an_event_at_a_hub_marks_nobody_else() -> None:
    graph = PartitionGraph(0, 1, DictRowStore(), lambda user: 0, materialise_common=False, hub_degree=3)
    for leaf in range(1, 5):  # 0 gets a 4th neighbour: a hub now, every leaf marked once
        graph.apply_connection(0, leaf, "add", leaf)
    graph.take_changed_users()
    graph.apply_connection(0, 5, "add", 10)
    own, two_hop = graph.take_changed_users()
    assert own == {0, 5} and two_hop <= {0, 5}  # the leaves see no 2-path through the hub appear
    assert graph.common_neighbor_counts(1) == {}
    graph.apply_connection(0, 5, "remove", 11)
    graph.apply_connection(0, 4, "remove", 12)  # back to 3 neighbours: no longer a hub, its leaves marked
    own, two_hop = graph.take_changed_users()
    assert {1, 2, 3} <= two_hop
    assert graph.common_neighbor_counts(1) == {2: 1, 3: 1}


def test_the_settings_refuse_a_hub_degree_with_materialised_rows() -> None:
    import pytest

    from pymk.settings import Settings

    with pytest.raises(ValueError, match="PYMK_HUB_DEGREE=5 needs PYMK_COMMON_COUNTS=on-read"):
        Settings(hub_degree=5)
    assert Settings(hub_degree=5, common_counts="on-read").hub_degree == 5
    with pytest.raises(ValueError, match="PYMK_COMMON_COUNTS='rows' is not one of materialised, on-read"):
        Settings.from_env({"PYMK_COMMON_COUNTS": "rows"})


def test_the_worker_sources_mutual_connections_leave_hubs_out() -> None:
    """The reasons' mutual connections (WorkerRankingSource.common_neighbors reads neighbour_rows) agree with the
    counts: a hub is nobody's mutual connection."""
    graph = PartitionGraph(0, 1, DictRowStore(), lambda user: 0, materialise_common=False, hub_degree=3)
    for ts, (a, b) in enumerate([(1, 0), (0, 2), (0, 3), (0, 4), (1, 5), (5, 2)], start=1):
        graph.apply_connection(a, b, "add", ts)
    assert [z for z, _ in graph.neighbour_rows(1)] == [5]  # 0 has 4 neighbours: a hub
    assert graph.common_neighbors(1, 2) == [5] and graph.common_neighbor_count(1, 2)[0] == 1
