"""Tier 1: the partitioned behavioural state is exact after any events, any delivery order, any duplicates —
compared with a plain-Python oracle computed from the set of distinct events."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pymk.events import DismissalEvent, EngagementEvent, ProfileViewEvent
from pymk.features.behaviour import DAY_MS, InboundView, ItemEngagement, ItemMirrorUpdate, PartitionBehaviour
from pymk.features.storage import DictRowStore, RocksRowStore
from support.clusters import BehaviourCluster

USERS = range(8)
ITEMS = range(6)
AS_OF = 10 * DAY_MS

Event = tuple[str, int, int, int]  # (kind, user, other user or item, ts)


class Oracle:
    """The features straight from the set of distinct events."""

    def __init__(self, events: list[Event], max_item_fanout: int | None) -> None:
        distinct = set(events)
        self.views: dict[tuple[int, int], set[int]] = {}
        self.dismissals: dict[tuple[int, int], set[int]] = {}
        self.first: dict[tuple[int, int], int] = {}  # (user, item) → first ts
        for kind, user, other, ts in distinct:
            if kind == "view":
                self.views.setdefault((user, other), set()).add(ts)
            elif kind == "dismiss":
                self.dismissals.setdefault((user, other), set()).add(ts)
            else:
                self.first[(user, other)] = min(ts, self.first.get((user, other), ts))
        self.engagers: dict[int, set[int]] = {}
        for user, item in self.first:
            self.engagers.setdefault(item, set()).add(user)
        self.hubs = {i for i, users in self.engagers.items()
                     if max_item_fanout is not None and len(users) > max_item_fanout}

    def view_count(self, u: int, v: int) -> tuple[int, int | None]:
        stamps = self.views.get((u, v), set())
        return len(stamps), max(stamps, default=None)

    def mutual(self, u: int, v: int) -> tuple[int, int | None]:
        """Replay event time: the last ts at which min(views u→v so far, views v→u so far) changed."""
        out, back = self.views.get((u, v), set()), self.views.get((v, u), set())
        value, last = 0, None
        for t in sorted(out | back):
            now = min(sum(1 for x in out if x <= t), sum(1 for x in back if x <= t))
            if now != value:
                value, last = now, t
        return value, last

    def recency(self, u: int, v: int) -> tuple[float | None, int | None]:
        stamps = self.views.get((u, v), set()) | self.views.get((v, u), set())
        if not stamps:
            return None, None
        return max(0, AS_OF - max(stamps)) / DAY_MS, max(stamps)

    def dismissed(self, u: int, v: int, since: int | None) -> tuple[bool, int | None]:
        kept = [t for t in self.dismissals.get((u, v), set()) if since is None or t >= since]
        return bool(kept), max(kept, default=None)

    def co_engaged(self, u: int, v: int) -> tuple[int, int | None]:
        common = [i for i, users in self.engagers.items() if u in users and v in users and i not in self.hubs]
        if u == v or not common:
            return 0, None
        return len(common), max(max(self.first[(u, i)], self.first[(v, i)]) for i in common)


def assert_exact(cluster: BehaviourCluster, oracle: Oracle, dismissal_since: int | None = None) -> None:
    for u in USERS:
        node = cluster.at(u)
        counts: dict[int, tuple[int, int]] = {}
        co_counts: dict[int, int] = {}
        for v in USERS:
            out, back = oracle.view_count(u, v), oracle.view_count(v, u)
            assert node.query_viewed_candidate_profile(u, v) == out
            assert node.candidate_viewed_query_profile(u, v) == back
            assert node.mutual_profile_views(u, v) == oracle.mutual(u, v)
            days, ts = node.profile_view_recency_days(u, v, AS_OF)
            expected_days, expected_ts = oracle.recency(u, v)
            assert ts == expected_ts
            assert days == pytest.approx(expected_days) if expected_days is not None else days is None
            assert node.dismissed(u, v) == oracle.dismissed(u, v, None)
            assert node.dismissed(u, v, since_ms=dismissal_since) == oracle.dismissed(u, v, dismissal_since)
            assert node.co_engaged_with_content(u, v) == oracle.co_engaged(u, v)
            features = node.pair_features(u, v, AS_OF)
            assert features["co_engaged_with_content"] == oracle.co_engaged(u, v)
            assert features["dismissed"] == (int(oracle.dismissed(u, v, None)[0]), oracle.dismissed(u, v, None)[1])
            if out[0] or back[0]:
                counts[v] = (out[0], back[0])
            if oracle.co_engaged(u, v)[0]:
                co_counts[v] = oracle.co_engaged(u, v)[0]
        assert node.profile_view_counts(u) == counts
        assert node.co_engaged_counts(u) == co_counts
        assert node.dismissed_candidates(u) == {v for v in USERS if oracle.dismissed(u, v, None)[0]}
        assert node.dismissed_candidates(u, since_ms=dismissal_since) == \
            {v for v in USERS if oracle.dismissed(u, v, dismissal_since)[0]}
        assert node.engaged_items(u) == {i: ts for (user, i), ts in oracle.first.items() if user == u}
        # ItemEngagementSource: the counts are those of the items' engagers, and each item's stamp is in the user's
        recounted = Counter(v for item in node.engaged_items(u) for v in node.item_engagers(item) if v != u)
        assert recounted == co_counts
        assert all(node.item_stamp(item) <= node.co_engagement_stamp(u) for item in node.engaged_items(u))
    for item in ITEMS:  # the owner's set, and every mirror of it, converged
        hub = item in oracle.hubs
        assert cluster.at(item).is_hub_item(item) == hub
        exact = {u: oracle.first[(u, item)] for u in oracle.engagers.get(item, set())}
        for node in {cluster.part(u) for u in exact}:
            row = cluster.nodes[node].item_row(item)
            assert (row.hub, row.engagers) == ((True, {}) if hub else (False, exact))


event_lists = st.lists(
    st.one_of(
        st.tuples(st.just("view"), st.sampled_from(USERS), st.sampled_from(USERS), st.integers(0, 12)),
        st.tuples(st.just("dismiss"), st.sampled_from(USERS), st.sampled_from(USERS), st.integers(0, 12)),
        st.tuples(st.just("engage"), st.sampled_from(USERS), st.sampled_from(ITEMS), st.integers(0, 12)),
    ),
    max_size=70,
)


@settings(max_examples=200, deadline=None)
@given(events=event_lists, partitions=st.integers(1, 4), fanout=st.sampled_from([None, None, 0, 1, 2, 3]),
       since=st.integers(0, 13), seed=st.integers(0, 10**6))
def test_exact_after_any_events_and_any_delivery_order(events: list[Event], partitions: int, fanout: int | None,
                                                       since: int, seed: int) -> None:
    rng = random.Random(seed)
    cached = rng.choice([0, 2_000_000])  # 0: every flush drops the cache, so rows must round-trip the store
    cluster = BehaviourCluster(partitions, rng, max_item_fanout=fanout, max_cached_rows=cached)
    stream = events + [e for e in events if rng.random() < 0.2]  # duplicate events, anywhere
    rng.shuffle(stream)
    for event in stream:
        cluster.event(*event)
        if rng.random() < 0.5:
            cluster.deliver_some(rng.random())
        if rng.random() < 0.2:
            rng.choice(cluster.nodes).flush()
    cluster.drain()
    assert_exact(cluster, Oracle(events, fanout), dismissal_since=since)


@settings(max_examples=50, deadline=None)
@given(events=event_lists, fanout=st.sampled_from([None, 2]), seed=st.integers(0, 10**6))
def test_replaying_everything_again_changes_nothing(events: list[Event], fanout: int | None, seed: int) -> None:
    cluster = BehaviourCluster(3, random.Random(seed), max_item_fanout=fanout)
    for event in events:
        cluster.event(*event)
    cluster.drain()
    for node in cluster.nodes:
        node.flush()
    for event in reversed(events):  # duplicates, in another order
        assert not cluster.event(*event)
    assert cluster.in_flight == []  # nothing new: nothing is sent
    assert all(node.dirty_rows() == ({}, []) for node in cluster.nodes)
    assert_exact(cluster, Oracle(events, fanout))


def test_hand_computed_views_and_dismissals() -> None:
    cluster = BehaviourCluster(2, random.Random(0))
    for ts in (100, 300, 300, 500):  # 300 twice: one distinct view
        cluster.event("view", 0, 1, ts)
    cluster.event("view", 1, 0, 200)
    cluster.event("view", 1, 0, 50)
    cluster.drain()
    a, b = cluster.at(0), cluster.at(1)
    assert a.query_viewed_candidate_profile(0, 1) == (3, 500)
    assert a.candidate_viewed_query_profile(0, 1) == (2, 200)
    # 0→1 at {100, 300, 500}, 1→0 at {50, 200}: the minimum reached 2 at max(300, 200)
    assert a.mutual_profile_views(0, 1) == (2, 300)
    assert b.mutual_profile_views(1, 0) == (2, 300)  # the same from the other side
    assert b.query_viewed_candidate_profile(1, 0) == (2, 200)
    assert a.profile_view_recency_days(0, 1, 500 + 2 * DAY_MS) == (2.0, 500)
    assert a.profile_view_recency_days(0, 1, 0) == (0.0, 500)  # a view "after" as_of is clamped to now
    assert a.profile_view_recency_days(0, 2, 500) == (None, None)
    assert a.mutual_profile_views(0, 2) == (0, None)
    cluster.event("dismiss", 0, 5, 1_000)
    cluster.event("dismiss", 0, 5, 3_000)
    cluster.event("dismiss", 0, 6, 2_000)
    assert a.dismissed(0, 5) == (True, 3_000)
    assert a.dismissal_count(0, 5) == 2
    assert a.dismissed(0, 6, since_ms=2_500) == (False, None)  # expired
    assert a.dismissed(0, 7) == (False, None)
    assert a.dismissed_candidates(0) == {5, 6}
    assert a.dismissed_candidates(0, since_ms=2_000) == {5, 6}
    assert a.dismissed_candidates(0, since_ms=2_001) == {5}


def test_hub_items_stop_counting_and_make_co_engagement_a_lower_bound() -> None:
    exact, bounded = BehaviourCluster(3, random.Random(1)), BehaviourCluster(3, random.Random(1), max_item_fanout=2)
    for cluster in (exact, bounded):
        for user in (0, 1, 2):  # item 100: three engagers, a hub when the fan-out is 2
            cluster.event("engage", user, 100, 10 + user)
        for user in (0, 1):  # item 200: two engagers, counted either way
            cluster.event("engage", user, 200, 20 + user)
        cluster.drain()
    assert exact.at(0).co_engaged_with_content(0, 1) == (2, 21)
    assert exact.at(0).co_engaged_counts(0) == {1: 2, 2: 1}
    assert bounded.at(0).co_engaged_with_content(0, 1) == (1, 21)
    assert bounded.at(0).co_engaged_counts(0) == {1: 1}
    assert bounded.at(100).is_hub_item(100)
    assert not bounded.at(0).item_engagers(100) and set(bounded.at(0).item_engagers(200)) == {0, 1}
    assert bounded.at(2).engaged_items(2) == {100: 12}  # the user's own items are kept
    for u in range(3):
        for v, count in bounded.at(u).co_engaged_counts(u).items():
            assert count <= exact.at(u).co_engaged_counts(u)[v]
    # hubs are terminal: later engagers change nothing at the item's partition
    bounded.event("engage", 3, 100, 5)
    bounded.drain()
    assert bounded.at(3).co_engaged_counts(3) == {}
    assert bounded.at(100).item_row(100).engagers == {}


def test_messages_are_plain_frozen_records() -> None:
    cluster = BehaviourCluster(2, random.Random(2))
    part = cluster.part
    viewer = next(u for u in range(100) if part(u) == 0)
    viewed = next(u for u in range(100) if part(u) == 1)
    node = cluster.nodes[0]
    node.apply_view(viewer, viewed, 5)
    node.apply_engagement(viewer, viewed, 6)  # an item id that lives at partition 1
    assert node.take_outbox() == {1: [InboundView(viewed, viewer, 5), ItemEngagement(viewed, viewer, 6)]}
    owner = cluster.nodes[1]
    owner.apply_message(ItemEngagement(viewed, viewer, 6))
    assert owner.take_outbox() == {0: [ItemMirrorUpdate(viewed, ((viewer, 6),))]}
    with pytest.raises(ValueError):
        node.apply_view(viewed, viewer, 5)  # not a local user of partition 0


def test_state_survives_flush_and_reopen_from_rocksdb(tmp_path: Path) -> None:
    rng = random.Random(3)
    stores = {p: RocksRowStore(tmp_path / f"p{p}") for p in range(3)}
    cluster = BehaviourCluster(3, rng, max_item_fanout=4, store_factory=lambda p: stores[p])
    events: list[Event] = []
    for t in range(400):
        kind = rng.choice(["view", "dismiss", "engage"])
        # items: item 0 is viral (a hub), the others rarely engaged with (mirrored and counted)
        other = (0 if rng.random() < 0.9 else rng.choice(ITEMS)) if kind == "engage" else rng.choice(USERS)
        events.append((kind, rng.choice(USERS), other, t % 37))
    for event in events:
        cluster.event(*event)
        cluster.deliver_some(0.3)
    cluster.drain()
    for node in cluster.nodes:
        node.flush()
        node.store.close()
    oracle = Oracle(events, 4)
    assert oracle.hubs and len(oracle.hubs) < len(oracle.engagers)  # both kinds of item are exercised
    cluster.nodes = [PartitionBehaviour(p, 3, RocksRowStore(tmp_path / f"p{p}"), cluster.part, max_item_fanout=4)
                     for p in range(3)]
    assert_exact(cluster, oracle, dismissal_since=20)
    for event in events:  # still idempotent after the reload
        assert not cluster.event(*event)
    for node in cluster.nodes:
        node.store.close()


def test_changed_users_are_taken_once_and_seen_again_after_a_new_change() -> None:
    node = PartitionBehaviour(0, 1, DictRowStore(), lambda user: 0)
    node.apply_event(ProfileViewEvent(1, 2, 10))
    assert node.take_changed_users() == {1, 2}  # the viewer and (its inbound view, local here) the viewed
    assert node.take_changed_users() == set()
    node.apply_event(ProfileViewEvent(1, 2, 10))  # a duplicate changes nothing
    assert node.take_changed_users() == set()
    node.apply_event(DismissalEvent(1, 3, 20))
    node.apply_event(EngagementEvent(4, 99, 30))
    assert node.take_changed_users() == {1, 4}
