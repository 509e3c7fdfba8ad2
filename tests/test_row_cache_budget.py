"""Tier 1: the memory bound of the row caches — evicting rows (when over budget) loses nothing, eviction is
oldest-loaded first and stops at the budget's ``keep`` share, the estimate is close to what the rows really
take, and measuring is throttled."""

from __future__ import annotations

import random
import time
import tracemalloc
from pathlib import Path

from test_graph_state import assert_exact, lww_graph

from pymk.events import DismissalEvent, EngagementEvent, ProfileViewEvent
from pymk.features.behaviour import PartitionBehaviour
from pymk.features.graph import PartitionGraph
from pymk.features.storage import CacheBudget, DictRowStore
from support.clusters import GraphCluster


def test_features_stay_exact_when_rows_are_evicted_after_every_flush() -> None:
    rng = random.Random(8)
    cluster = GraphCluster(3, rng)
    # tiny budgets: every check evicts, nearly everything (one at 0: everything)
    budgets = [CacheBudget(max_bytes=max_bytes, min_interval_s=0.0) for max_bytes in (0, 20_000, 60_000)]
    events = [(rng.randrange(40), rng.randrange(40), rng.choice(["add", "add", "remove"]), t) for t in range(400)]
    events = [e for e in events if e[0] != e[1]]
    for index, event in enumerate(events):
        cluster.connection(*event)
        cluster.deliver_some(0.5)
        if index % 7 == 0:
            for graph, budget in zip(cluster.graphs, budgets, strict=True):
                graph.flush()
                budget.check(graph.cached_bytes, graph.evict_oldest)
    cluster.drain()
    assert all(budget.evictions > 10 for budget in budgets)
    assert_exact(cluster, lww_graph(events), range(40))


def test_behaviour_survives_a_dropped_cache() -> None:
    part = lambda user: 0  # noqa: E731 - one partition
    behaviour = PartitionBehaviour(0, 1, DictRowStore(), part)
    for ts in range(1, 60):
        behaviour.apply_event(ProfileViewEvent(ts % 5, 10 + ts % 7, ts))
        behaviour.apply_event(DismissalEvent(ts % 5, 20 + ts % 3, ts))
        behaviour.apply_event(EngagementEvent(ts % 5, 100 + ts % 4, ts))
    behaviour.take_outbox()

    def snapshot() -> list[object]:
        return [(behaviour.profile_view_counts(u), behaviour.dismissed_candidates(u), behaviour.engaged_items(u),
                 behaviour.co_engaged_counts(u)) for u in range(5)]

    before = snapshot()
    behaviour.flush()
    assert behaviour.cached_bytes() > 0
    behaviour.drop_cache()
    assert behaviour.cached_bytes() == 0
    assert snapshot() == before


def test_the_estimate_is_close_to_the_memory_the_rows_take() -> None:
    rng = random.Random(9)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        graph = PartitionGraph(0, 1, DictRowStore(), lambda user: 0)
        for t in range(2_000):
            u, v = rng.randrange(400), rng.randrange(400)
            if u != v:
                graph.apply_connection(u, v, "add", 10**12 + t)
        graph.take_outbox()
        graph.flush()
        graph.store = DictRowStore()  # the rows' encoded copies are not the cache: leave them out
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert 0.5 * used < graph.cached_bytes() < 2.0 * used, (graph.cached_bytes(), used)


def test_measuring_is_throttled_and_evicts_down_to_the_kept_share() -> None:
    budget = CacheBudget(max_bytes=100, min_interval_s=3600.0, keep=0.7)
    calls: list[int] = []
    fractions: list[float] = []

    def measure() -> int:
        calls.append(1)
        return 1000

    budget.check(measure, fractions.append)
    budget.check(measure, fractions.append)
    assert len(calls) == 1 and budget.evictions == 1
    assert fractions == [1.0 - 0.07]  # 1000 bytes down to 70 % of 100


def test_eviction_forgets_the_oldest_loaded_rows_first() -> None:
    graph = PartitionGraph(0, 1, DictRowStore(), lambda user: 0)
    for user in range(1, 11):
        graph.apply_connection(0, user, "add", user)
    graph.take_outbox()
    graph.flush()
    graph.drop_cache()
    for user in range(1, 11):  # loaded in this order
        graph.adjacency_row(user)
    graph.adjacency_row(1)  # read again: no reload, still the oldest
    graph.evict_oldest(0.5)
    assert sorted(graph._adjacency) == [6, 7, 8, 9, 10]
    assert graph.neighbours(3) == {0: 3}  # read back from the store, now the youngest
    assert list(graph._adjacency)[-1] == 3


def test_a_fast_growing_cache_is_evicted_before_its_interval_is_over() -> None:
    budget = CacheBudget(max_bytes=1000, min_interval_s=3600.0, keep=0.7)
    rows = [5]  # 100 bytes a row
    measured: list[int] = []

    def measure() -> int:
        measured.append(rows[0] * 100)
        return rows[0] * 100

    def evict(fraction: float) -> None:
        rows[0] = round(rows[0] * (1.0 - fraction))

    budget.check(measure, evict, lambda: rows[0])
    assert measured == [500] and budget.bytes_per_row == 100.0
    rows[0] = 9  # under the budget by the row count: nothing to do until the interval is over
    budget.check(measure, evict, lambda: rows[0])
    assert measured == [500] and budget.estimated_bytes == 900 and budget.evictions == 0
    rows[0] = 30  # 3,000 bytes by the row count: evicted now, down to 70 % of the budget, without a walk
    budget.check(measure, evict, lambda: rows[0])
    assert measured == [500] and budget.evictions == budget.evictions_by_estimate == 1
    assert rows[0] == 7 and budget.estimated_bytes == 700


def test_every_holder_of_a_partition_keeps_the_row_holder_protocol(tmp_path: Path) -> None:
    from pymk.features.storage import CachedRowHolder, RowHolder
    from pymk.streams.state import PartitionState

    state = PartitionState.open(0, 1, tmp_path / "p0", lambda user: 0)
    try:
        assert len(state.parts) == 6 and all(isinstance(part, RowHolder) for part in state.parts)
        assert all(isinstance(part, CachedRowHolder) for part in state.cached_parts)
        assert not isinstance(state.work, CachedRowHolder)  # the pending work is the backlog: never evicted
    finally:
        state.store.close()


def test_a_cache_far_under_its_budget_is_measured_less_often() -> None:
    """Under a quarter of the budget the next measurement waits FAR_UNDER_WAIT_FACTOR times longer (the row-count
    estimate still runs at every check); near the budget the interval is the plain one."""
    for max_bytes, measured_again in ((100_000, False), (2_000, True)):
        budget = CacheBudget(max_bytes=max_bytes, min_interval_s=0.05, keep=0.7)
        calls: list[int] = []

        def measure(calls: list[int] = calls) -> int:
            calls.append(1)
            return 1_000

        budget.check(measure, lambda fraction: None, lambda: 10)
        time.sleep(0.1)  # past the plain interval, well within ten of them
        budget.check(measure, lambda fraction: None, lambda: 10)
        assert len(calls) == (2 if measured_again else 1), max_bytes
