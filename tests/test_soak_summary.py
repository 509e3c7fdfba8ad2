"""Tier 1: the soak's verdicts from its samples (``pymk soak`` itself runs for minutes: not in the suite)."""

from __future__ import annotations

from dataclasses import replace
from itertools import islice

from pymk.bench.soak import SoakSample, _final_edges, endless_events, summarise
from pymk.events import InputEvent
from pymk.streams.producer import synthetic_events


def samples(lag_of: dict[str, float], load_s: float = 300.0) -> list[SoakSample]:
    """One sample every 5 s: lag by ``lag_of['base'] + lag_of['growth'] * t``; 20 users join per second, each
    adding 0.002 MB outside the caches; the row cache fills to 50 MB by t = 100 s and stays there."""
    out = []
    for step in range(int(load_s / 5) + 1):
        t = 5.0 * step
        users = 1000 + 20 * int(t)
        row_cache = min(50.0, 0.5 * t)
        out.append(SoakSample(t_s=t, phase="load", produced=int(200 * t), processed=int(200 * t), invalid=0,
                              lag_total=int(lag_of["base"] + lag_of["growth"] * t), lag_inputs=None,
                              lag_partition_messages=None, rss_mb=600.0 + row_cache + 0.002 * users,
                              worker_cpu_percent=80.0, users=users, row_cache_mb=row_cache, rocksdb_mb=0.0,
                              malloc_in_use_mb=500.0 + 0.01 * t, malloc_free_mb=30.0))
    return out


def test_steady_lag_is_bounded_and_growing_lag_is_not() -> None:
    assert summarise(samples({"base": 400, "growth": 0}), rate=200, load_s=300)["lag_bounded"] is True
    # a worker 30 events/s short of the rate: lag grows by 30 per second, 3,000 more in the last third
    assert summarise(samples({"base": 400, "growth": 30}), rate=200, load_s=300)["lag_bounded"] is False


def test_memory_growth_is_measured_per_new_user_apart_from_the_bounded_caches() -> None:
    summary = summarise(samples({"base": 400, "growth": 0}), rate=200, load_s=300)
    assert summary["users_last"] == 1000 + 20 * 300
    assert summary["row_cache_mb_max"] == 50.0
    # after t = 100 s only the per-user part grows: 0.002 MB per user = 2 MB per 1,000 users
    assert abs(summary["rss_outside_bounded_caches_mb_per_1000_new_users"] - 2.0) < 1e-6
    assert abs(summary["rss_mb_per_1000_new_users_last_two_thirds"] - 2.0) < 1e-6
    # and per minute: 20 users a second * 0.002 MB = 2.4 MB a minute outside the caches, whatever they hold
    assert abs(summary["rss_outside_bounded_caches_slope_mb_per_min_last_two_thirds"] - 2.4) < 1e-6
    assert summary["rss_outside_bounded_caches_mb_last_third_mean"] > summary[
        "rss_outside_bounded_caches_mb_middle_third_mean"]
    # the parts sampled beside it, by thirds: malloc's bytes in use at t = 150 and 250 s on average
    parts = summary["memory_parts_mb_middle_and_last_third_mean"]
    assert [round(x, 6) for x in parts["malloc_in_use_mb"]] == [501.475, 502.5]
    assert parts["malloc_free_mb"] == [30.0, 30.0]
    assert parts["ann_index_mb"] == [None, None]  # not sampled: no figure rather than a zero


def test_rss_that_levels_off_is_bounded_and_rss_that_keeps_climbing_is_not() -> None:
    flat = samples({"base": 400, "growth": 0})
    assert summarise(flat, rate=200, load_s=300)["rss_bounded"] is True  # +12 MB on ~680 between the thirds
    climbing = [replace(s, rss_mb=(s.rss_mb or 0.0) + 1.0 * s.t_s) for s in flat]  # +1 MB a second
    assert summarise(climbing, rate=200, load_s=300)["rss_bounded"] is False


def ids_and_times(events: list[InputEvent]) -> tuple[set[int], list[int]]:
    ids = {getattr(e, name) for e in events for name in ("src", "dst", "user", "viewer", "viewed", "candidate")
           if hasattr(e, name)}
    return ids, [e.ts for e in events]


def test_rounds_bring_new_users_or_move_the_same_users_forward_in_time() -> None:
    first = synthetic_events(50, seed=1)
    n = len(first)
    fresh = list(islice(endless_events(50, 1), 2 * n + 10))
    same = list(islice(endless_events(50, 1, same_users=True), 2 * n + 10))
    assert fresh[:n] == same[:n] == first
    fresh_ids, _ = ids_and_times(fresh[n:])
    same_ids, same_times = ids_and_times(same[n:])
    first_ids, first_times = ids_and_times(first)
    assert not fresh_ids & first_ids  # a new population
    assert same_ids <= set(range(50)) and same_ids & first_ids  # the same population ...
    assert min(same_times) > max(first_times)  # ... later: new events, not replays that merge into nothing


def test_same_users_rounds_replace_the_previous_rounds_connections() -> None:
    """A fixed population at a steady state: each round removes what the previous one left and does not make
    again, so the graph stays one network's size instead of densifying round after round."""
    first = synthetic_events(60, seed=1)
    n = len(first)
    stream = list(islice(endless_events(60, 1, same_users=True), 4 * n))
    sizes = [len(_final_edges(stream[:end])) for end in (n, 2 * n, 3 * n)]
    one_network = len(_final_edges(first))
    assert all(0.7 * one_network <= size <= 1.3 * one_network for size in sizes), (sizes, one_network)
    assert [e.ts for e in stream] == sorted(e.ts for e in stream)
