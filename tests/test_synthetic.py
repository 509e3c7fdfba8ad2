"""Tests of pymk.synthetic: the generated stream is valid (ordered, consistent, signed-up ids) and every
PYMK signal is really in it (homophily, triadic closure, views before connections, dismissals,
co-engagement), and replay behaviour never leaks the future."""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path

import networkx as nx
import pytest

from pymk.events import (
    ConnectionEvent,
    DismissalEvent,
    EngagementEvent,
    InputEvent,
    Profile,
    ProfileViewEvent,
    UserEvent,
)
from pymk.synthetic import SyntheticConfig, behaviour_for_replay, merge_by_time, synthetic_network

N_USERS = 2000
CONFIG = SyntheticConfig(n_users=N_USERS, seed=11)
COLLEGE_MSG = Path(__file__).resolve().parents[1] / "data" / "collegemsg" / "CollegeMsg.txt"


def pair(a: int, b: int) -> tuple[int, int]:
    return (a, b) if a < b else (b, a)


def ids_of(event: InputEvent) -> tuple[int, ...]:
    """The user ids an event names (items are not users)."""
    if isinstance(event, ConnectionEvent):
        return (event.src, event.dst)
    if isinstance(event, ProfileViewEvent):
        return (event.viewer, event.viewed)
    if isinstance(event, DismissalEvent):
        return (event.user, event.candidate)
    return (event.user,)


def signups(events: list[InputEvent]) -> dict[int, int]:
    first: dict[int, int] = {}
    for e in events:
        if isinstance(e, UserEvent):
            first.setdefault(e.user, e.ts)
    return first


def first_profiles(events: list[InputEvent]) -> dict[int, Profile]:
    out: dict[int, Profile] = {}
    for e in events:
        if isinstance(e, UserEvent):
            out.setdefault(e.user, e.profile)
    return out


def replay_graph(events: list[InputEvent]) -> nx.Graph:
    """The final graph, asserting on the way that adds and removes are consistent."""
    graph = nx.Graph()
    for e in events:
        if isinstance(e, ConnectionEvent):
            assert e.src != e.dst, e
            if e.action == "add":
                assert not graph.has_edge(e.src, e.dst), f"add of an existing edge: {e}"
                graph.add_edge(e.src, e.dst)
            else:
                assert e.action == "remove"
                assert graph.has_edge(e.src, e.dst), f"remove of an absent edge: {e}"
                graph.remove_edge(e.src, e.dst)
    return graph


@pytest.fixture(scope="module")
def events() -> list[InputEvent]:
    return synthetic_network(CONFIG)


@pytest.fixture(scope="module")
def adds(events: list[InputEvent]) -> list[ConnectionEvent]:
    return [e for e in events if isinstance(e, ConnectionEvent) and e.action == "add"]


@pytest.fixture(scope="module")
def graph(events: list[InputEvent]) -> nx.Graph:
    return replay_graph(events)


@pytest.fixture(scope="module")
def random_pairs() -> list[tuple[int, int]]:
    rnd = random.Random(0)
    return [tuple(rnd.sample(range(N_USERS), 2)) for _ in range(20_000)]  # type: ignore[misc]


# --- synthetic_network: validity ------------------------------------------------------------------------

def test_deterministic_for_a_seed() -> None:
    small = SyntheticConfig(n_users=300, seed=5)
    assert synthetic_network(small) == synthetic_network(small)
    assert synthetic_network(small) != synthetic_network(SyntheticConfig(n_users=300, seed=6))


def test_sorted_and_inside_the_window(events: list[InputEvent]) -> None:
    stamps = [e.ts for e in events]
    assert stamps == sorted(stamps)
    assert CONFIG.start_ms <= stamps[0] and stamps[-1] <= CONFIG.end_ms


def test_every_kind_is_there(events: list[InputEvent]) -> None:
    kinds = {type(e) for e in events}
    assert kinds == {UserEvent, ConnectionEvent, ProfileViewEvent, DismissalEvent, EngagementEvent}
    assert any(isinstance(e, ConnectionEvent) and e.action == "remove" for e in events)


def test_connection_stream_is_consistent(graph: nx.Graph) -> None:
    # replay_graph asserts: no self-loop, no add of a present edge, no remove of an absent one.
    assert graph.number_of_edges() > 0


def test_every_id_signed_up_before_it_is_used(events: list[InputEvent]) -> None:
    signed = signups(events)
    assert set(signed) == set(range(N_USERS))
    for e in events:
        for user in ids_of(e):
            assert signed[user] <= e.ts, f"{e} before the sign-up of {user} at {signed[user]}"


def test_profiles_are_complete_and_updates_come_later(events: list[InputEvent]) -> None:
    first = first_profiles(events)
    for profile in first.values():
        assert profile.company and profile.school and profile.industry and profile.title
        assert profile.skills is not None and 3 <= len(profile.skills) <= 8
        assert profile.geo is not None and -90 <= profile.geo[0] <= 90 and -180 <= profile.geo[1] <= 180
    signed = signups(events)
    updates = [e for e in events if isinstance(e, UserEvent) and e.ts > signed[e.user]]
    assert len(updates) > 0.02 * N_USERS
    for e in updates:  # a job change: new company (and title), nothing else restated
        assert e.profile.company and e.profile.company != first[e.user].company
        assert e.profile.school is None and e.profile.geo is None


def test_profileless_users_still_act() -> None:
    events = synthetic_network(SyntheticConfig(n_users=300, seed=2, profileless_share=0.1))
    signed = signups(events)
    named = {user for e in events for user in ids_of(e)}
    assert 0 < len(named - set(signed)) < 0.2 * 300


def test_items_are_not_users(events: list[InputEvent]) -> None:
    items = {e.item for e in events if isinstance(e, EngagementEvent)}
    assert items and min(items) >= CONFIG.item_id_base


def test_json_round_trip_types(events: list[InputEvent]) -> None:
    # Every field must be a plain Python value (a numpy int would break json.dumps).
    for e in events[:: max(1, len(events) // 2000)]:
        assert e.to_json()


def test_config_validates() -> None:
    with pytest.raises(ValueError):
        SyntheticConfig(n_users=1)
    with pytest.raises(ValueError):
        SyntheticConfig(removal_rate=1.5)
    scaled = SyntheticConfig(n_users=10_000).scaled()
    assert scaled.n_companies and scaled.n_schools and scaled.n_cities and scaled.n_items


# --- synthetic_network: signal ---------------------------------------------------------------------------

def test_degrees_match_the_target_and_are_heavy_tailed(graph: nx.Graph) -> None:
    degrees = [graph.degree(u) if u in graph else 0 for u in range(N_USERS)]
    mean = sum(degrees) / N_USERS
    assert abs(mean - CONFIG.avg_degree) < 0.15 * CONFIG.avg_degree
    assert max(degrees) > 5 * mean


def test_homophily(graph: nx.Graph, events: list[InputEvent], random_pairs: list[tuple[int, int]]) -> None:
    profiles = first_profiles(events)

    def share(pairs: list[tuple[int, int]], same: object) -> float:
        return sum(bool(same(profiles[a], profiles[b])) for a, b in pairs) / len(pairs)  # type: ignore[operator]

    def near(p: Profile, q: Profile) -> bool:  # same city: within a degree (cities are far apart)
        assert p.geo and q.geo
        return abs(p.geo[0] - q.geo[0]) < 1.0 and abs(p.geo[1] - q.geo[1]) < 1.0

    edges = list(graph.edges())
    for same, factor in ((lambda p, q: p.company == q.company, 3.0), (lambda p, q: p.school == q.school, 1.8),
                         (near, 2.0), (lambda p, q: p.industry == q.industry, 1.8)):
        assert share(edges, same) > factor * share(random_pairs, same)


def test_triadic_closure(graph: nx.Graph) -> None:
    clustering = nx.average_clustering(graph)
    er = nx.gnm_random_graph(graph.number_of_nodes(), graph.number_of_edges(), seed=0)
    assert clustering > 5 * nx.average_clustering(er)
    assert clustering > 0.08


def test_many_connections_are_preceded_by_views(events: list[InputEvent],
                                                adds: list[ConnectionEvent]) -> None:
    views: dict[tuple[int, int], list[int]] = defaultdict(list)
    for e in events:
        if isinstance(e, ProfileViewEvent):
            assert e.viewer != e.viewed
            views[pair(e.viewer, e.viewed)].append(e.ts)
    preceded = sum(any(ts < a.ts for ts in views.get(pair(a.src, a.dst), ())) for a in adds)
    assert preceded > 0.4 * len(adds)
    # Noise: views between pairs that never connect, some of them friends-of-friends at the end.
    connected = {pair(a.src, a.dst) for a in adds}
    never = [p for p in views if p not in connected]
    assert len(never) > 0.5 * N_USERS
    graph = replay_graph(events)
    fof = sum(1 for a, b in never if a in graph and b in graph and set(graph[a]) & set(graph[b]))
    assert fof > 0.1 * len(never)


def test_dismissed_pairs_are_plausible_and_never_connect_later(events: list[InputEvent]) -> None:
    graph = nx.Graph()
    company = {u: p.company for u, p in first_profiles(events).items()}
    dismissed: dict[tuple[int, int], int] = {}
    plausible = 0
    for e in events:
        if isinstance(e, UserEvent) and e.profile.company:
            company[e.user] = e.profile.company
        elif isinstance(e, ConnectionEvent):
            if e.action == "add":
                assert pair(e.src, e.dst) not in dismissed, f"{e} after a dismissal of the pair"
                graph.add_edge(e.src, e.dst)
            else:
                graph.remove_edge(e.src, e.dst)
        elif isinstance(e, DismissalEvent):
            assert e.user != e.candidate
            assert not graph.has_edge(e.user, e.candidate)
            dismissed[pair(e.user, e.candidate)] = e.ts
            mutual = (e.user in graph and e.candidate in graph
                      and bool(set(graph[e.user]) & set(graph[e.candidate])))
            plausible += mutual or company[e.user] == company[e.candidate]
    assert len(dismissed) > 0.3 * N_USERS * CONFIG.dismissals_per_user
    # Removals between the pick and the event can undo a few friend-of-friend paths.
    assert plausible > 0.9 * len(dismissed)


def test_co_engagement_carries_signal(events: list[InputEvent], graph: nx.Graph,
                                      random_pairs: list[tuple[int, int]]) -> None:
    items: dict[int, set[int]] = defaultdict(set)
    for e in events:
        if isinstance(e, EngagementEvent):
            items[e.user].add(e.item)

    def co(pairs: list[tuple[int, int]]) -> float:
        return sum(bool(items[a] & items[b]) for a, b in pairs) / len(pairs)

    assert co(list(graph.edges())) > 2 * co(random_pairs)


# --- behaviour_for_replay ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_connections(adds: list[ConnectionEvent]) -> list[tuple[int, int, int]]:
    """A stand-in for a real graph: the synthetic adds only, with no profiles or behaviour."""
    return [(a.src, a.dst, a.ts) for a in adds]


def connection_times(connections: list[tuple[int, int, int]]) -> tuple[dict[int, int], dict[tuple[int, int], int]]:
    first_user: dict[int, int] = {}
    first_pair: dict[tuple[int, int], int] = {}
    for u, v, ts in sorted(connections, key=lambda c: c[2]):
        if u == v:
            continue
        first_user.setdefault(u, ts)
        first_user.setdefault(v, ts)
        first_pair.setdefault(pair(u, v), ts)
    return first_user, first_pair


def test_replay_profiles_for_every_user(real_connections: list[tuple[int, int, int]]) -> None:
    extra = [10**8, 10**8 + 1]
    behaviour = behaviour_for_replay(real_connections, seed=3, users=extra)
    first_user, _ = connection_times(real_connections)
    signed = signups(behaviour)
    assert set(signed) == set(first_user) | set(extra)
    for user, ts in first_user.items():
        assert signed[user] < ts  # strictly before, so any ts-sorted merge delivers it first
    for profile in first_profiles(behaviour).values():
        assert profile.company and profile.school and profile.industry and profile.title and profile.geo
    stamps = [e.ts for e in behaviour]
    assert stamps == sorted(stamps)
    assert all(isinstance(e, UserEvent | ProfileViewEvent | DismissalEvent | EngagementEvent) for e in behaviour)


def test_replay_is_deterministic(real_connections: list[tuple[int, int, int]]) -> None:
    some = real_connections[:3000]
    assert behaviour_for_replay(some, seed=1) == behaviour_for_replay(some, seed=1)
    assert behaviour_for_replay(some, seed=1) != behaviour_for_replay(some, seed=2)


def test_replay_preceding_views_only_before_real_connections(real_connections: list[tuple[int, int, int]]
                                                              ) -> None:
    behaviour = behaviour_for_replay(real_connections, seed=4, noise_views_per_user=0.0)
    _, first_pair = connection_times(real_connections)
    signed = signups(behaviour)
    views = [e for e in behaviour if isinstance(e, ProfileViewEvent)]
    assert len(views) > 0.3 * len(first_pair)
    for v in views:
        assert v.ts < first_pair[pair(v.viewer, v.viewed)], v
        assert signed[v.viewer] <= v.ts and signed[v.viewed] <= v.ts


def test_replay_behaviour_never_leaks(real_connections: list[tuple[int, int, int]]) -> None:
    behaviour = behaviour_for_replay(real_connections, seed=5)
    first_user, first_pair = connection_times(real_connections)
    signed = signups(behaviour)
    end = max(ts for _, _, ts in real_connections)
    noise = 0
    for e in behaviour:
        assert e.ts <= end
        for user in ids_of(e):
            assert signed[user] <= e.ts
        if isinstance(e, ProfileViewEvent):
            when = first_pair.get(pair(e.viewer, e.viewed))
            assert when is None or e.ts < when  # either a preceding view or a pair that never connects
            noise += when is None
        elif isinstance(e, DismissalEvent):
            assert pair(e.user, e.candidate) not in first_pair
        elif isinstance(e, EngagementEvent):
            assert e.item >= 10**9
    assert noise > 0


def test_replay_dismissals_are_friends_of_friends(real_connections: list[tuple[int, int, int]]) -> None:
    behaviour = behaviour_for_replay(real_connections, seed=6, dismissals_per_user=1.0)
    dismissals = [e for e in behaviour if isinstance(e, DismissalEvent)]
    assert len(dismissals) > 0.2 * N_USERS
    graph = nx.Graph()
    stream = merge_by_time([ConnectionEvent(u, v, "add", ts) for u, v, ts in real_connections], dismissals)
    for e in stream:
        if isinstance(e, ConnectionEvent):
            graph.add_edge(e.src, e.dst)
        else:
            assert isinstance(e, DismissalEvent)
            assert set(graph[e.user]) & set(graph[e.candidate]), e


def test_replay_profile_updates_use_only_the_past(real_connections: list[tuple[int, int, int]]) -> None:
    behaviour = behaviour_for_replay(real_connections, seed=8)
    signed = signups(behaviour)
    held: dict[int, list[tuple[int, str]]] = defaultdict(list)  # user -> (ts, company) as they change
    for e in behaviour:
        if isinstance(e, UserEvent) and e.profile.company:
            held[e.user].append((e.ts, e.profile.company))
    neighbours_before: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for u, v, ts in real_connections:
        neighbours_before[u].append((ts, v))
        neighbours_before[v].append((ts, u))
    updates = [e for e in behaviour if isinstance(e, UserEvent) and e.ts > signed[e.user] and e.profile.company]
    assert updates
    for e in updates:
        # The new company was held, by then, by a neighbour connected strictly earlier.
        sources = {company for ts, v in neighbours_before[e.user] if ts < e.ts
                   for when, company in held[v] if when <= e.ts}
        assert e.profile.company in sources, e


def test_replay_handles_messy_input() -> None:
    messy = [(5, 5, 1000), (1, 2, 3000), (2, 1, 4000), (3, 1, 2000), (2, 3, 5000)]  # loop, repeat, unsorted
    behaviour = behaviour_for_replay(messy, seed=0)
    assert set(signups(behaviour)) == {1, 2, 3}
    assert behaviour_for_replay([], seed=0) == []
    assert set(signups(behaviour_for_replay([], seed=0, users=[4, 7]))) == {4, 7}


def test_replay_on_real_data() -> None:
    from pymk.datasets import load_edge_history

    history = load_edge_history(COLLEGE_MSG)
    behaviour = behaviour_for_replay(history.connections, seed=7)
    assert set(signups(behaviour)) == history.users
    _, first_pair = connection_times(history.connections)
    for e in behaviour:
        if isinstance(e, ProfileViewEvent):
            when = first_pair.get(pair(e.viewer, e.viewed))
            assert when is None or e.ts < when


# --- merge_by_time --------------------------------------------------------------------------------------------

def test_merge_by_time_is_sorted_and_stable() -> None:
    a = [UserEvent(1, 10), ConnectionEvent(1, 2, "add", 20)]
    b = [UserEvent(2, 5), ProfileViewEvent(2, 1, 10), EngagementEvent(2, 10**9, 30)]
    merged = merge_by_time(a, b)
    assert [e.ts for e in merged] == [5, 10, 10, 20, 30]
    assert merged[1] == a[0] and merged[2] == b[1]  # equal ts: the first stream first
    assert merge_by_time() == []
