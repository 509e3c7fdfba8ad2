"""The popular source's order (features/activity.py, ActivityLeaderboard): answered from its leaders, it must equal a
sort of every user at every moment — through rising keys, falling ones (removed connections), users losing all
activity, ties, degree changes and any k asked."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pymk.features.activity import DAY_MS, ActivityLeaderboard, MergedTops, activity_rank_key


def brute_force_top(held: dict[int, tuple[float, int]], k: int) -> list[int]:
    """Every user with activity sorted by key desc, degree desc, id asc."""
    ranked = sorted((-key, -degree, user) for user, (key, degree) in held.items() if key > -math.inf)
    return [user for _, _, user in ranked[:k]]


# one step: (user, weekly value index, anchor in days, degree) or a query (k)
_update = st.tuples(st.integers(0, 59), st.sampled_from([0.0, 1.0, 2.0]), st.integers(0, 6),  # many ties
                    st.integers(0, 9))
_step = st.one_of(_update.map(lambda u: ("update", u)), st.integers(1, 70).map(lambda k: ("top", k)))


class SmallBoard(ActivityLeaderboard):
    """Small leader counts, so that a run of a few dozen steps cuts, shrinks and rescans them many times."""

    MARGIN = 2
    MIN_LEADERS = 3
    SLACK = 2


@given(st.lists(_step, min_size=1, max_size=120))
@settings(max_examples=300, deadline=None)
def test_the_leaders_answer_as_a_sort_of_every_user(steps: list[tuple[str, object]]) -> None:
    board = SmallBoard()
    held: dict[int, tuple[float, int]] = {}
    for kind, arg in steps:
        if kind == "update":
            user, weekly, anchor_days, degree = arg  # type: ignore[misc]
            values = (weekly, weekly, weekly)
            board.update(user, values, anchor_days * DAY_MS, degree)
            held[user] = (activity_rank_key(values, anchor_days * DAY_MS), degree)
        else:
            assert board.top(arg) == brute_force_top(held, arg)  # type: ignore[arg-type]
    for k in (1, 5, 100):
        assert board.top(k) == brute_force_top(held, k)


def test_a_query_after_updates_does_not_scan_every_user() -> None:
    """Rising keys (users connecting, time moving on) keep the answer in the leaders: one pass over the
    population at the first query, none after, however many queries and updates follow."""
    rng = np.random.default_rng(7)
    board = ActivityLeaderboard()
    users = 20_000
    for user in range(users):
        board.update(user, (1.0, float(rng.integers(1, 50)), 1.0), int(rng.integers(0, 30)) * DAY_MS, 5)
    assert len(board.top(100)) == 100
    assert board.full_scans == 1
    for step in range(5_000):
        user = int(rng.integers(0, users))
        board.update(user, (1.0, float(rng.integers(1, 50)), 1.0), (30 + step // 100) * DAY_MS, 6)
        if step % 50 == 0:
            assert len(board.top(100 + step % 7)) == 100 + step % 7
    assert board.full_scans == 1
    assert len(board._leaders) <= board.SLACK * board._wanted


def test_a_user_arriving_exactly_at_the_threshold_is_a_leader() -> None:
    """Ties on the key are broken by degree: a user whose key equals the threshold's may still be first."""
    board = SmallBoard()
    for user in range(10):
        board.update(user, (1.0, 1.0, 1.0), DAY_MS, user)
    assert board.top(1) == [9]
    board.update(20, (1.0, 1.0, 1.0), DAY_MS, 100)
    assert board.top(1) == [20]


def test_an_older_record_does_not_move_a_user() -> None:
    """Records arrive in any order (a replay, two owners across a rebalance): the newest version wins."""
    board = ActivityLeaderboard()
    board.update(1, (1.0, 1.0, 1.0), DAY_MS, 3, version=10)
    board.update(2, (1.0, 2.0, 1.0), DAY_MS, 3, version=4)
    assert board.top(2) == [2, 1]
    board.update(1, (1.0, 9.0, 1.0), DAY_MS, 3, version=9)  # older than what it holds: ignored
    assert board.top(2) == [2, 1]
    board.update(1, (1.0, 9.0, 1.0), DAY_MS, 3, version=11)
    assert board.top(2) == [1, 2]


@given(st.lists(_update, min_size=1, max_size=80), st.integers(1, 5), st.integers(1, 6), st.integers(1, 40))
@settings(max_examples=300, deadline=None)
def test_merged_partition_tops_are_the_global_order_as_far_as_they_answer(
        updates: list[tuple[int, float, int, int]], partitions: int, per_partition: int, k: int) -> None:
    """Each partition's board publishes its best ``per_partition`` users; the merge answers with the global
    order's first k, or with a shorter exact prefix (counted) when a cut list may hide a user before the k-th."""
    everyone = ActivityLeaderboard()
    boards = [ActivityLeaderboard() for _ in range(partitions)]
    for user, weekly, anchor_days, degree in updates:
        values = (weekly, weekly, weekly)
        everyone.update(user, values, anchor_days * DAY_MS, degree)
        boards[user % partitions].update(user, values, anchor_days * DAY_MS, degree)
    merged = MergedTops()
    for partition, board in enumerate(boards):
        entries = board.top_entries(per_partition + 1)
        merged.put(partition, 1, entries[:per_partition], complete=len(entries) <= per_partition)
    expected = everyone.top(k)
    got = merged.top(k)
    assert got == expected[: len(got)]
    assert len(got) == len(expected) or merged.answers_cut == 1
    if all(len(board.top(per_partition + 1)) <= per_partition for board in boards):  # nothing cut: all of it
        assert got == expected


def test_a_partitions_older_list_is_ignored() -> None:
    merged = MergedTops()
    assert merged.put(0, 5, [(1, 2.0, 3)], complete=True)
    assert not merged.put(0, 4, [(2, 9.0, 3)], complete=True)
    assert merged.top(5) == [1]
    assert merged.put(0, 6, [(2, 9.0, 3), (1, 2.0, 3)], complete=True) and merged.top(5) == [2, 1]
