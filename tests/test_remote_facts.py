"""Reachable globals (PYMK_GLOBALS_MODE=reachable, streams/remote_facts.py): a worker keeps the degree, activity and
profile of only the remote users it has read, fetched from their owners, and its lists are the lists of a worker
that keeps everyone's.

Tier 1 (UserGlobals' rules) and tier 2 (the refresher over partition states, the owner's answer served by a
stand-in for the HTTP post); the three workers over a broker are in tests/test_sharded_ann_workers.py."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path

from pymk.bench.worker_list import build_world
from pymk.features.graph import DegreeUpdate
from pymk.settings import Settings
from pymk.streams.codec import degree_record, popular_record, profile_record
from pymk.streams.globals import UserGlobals
from pymk.streams.remote_facts import (
    Answer,
    RemoteFacts,
    decode_answer,
    decode_request,
    encode_answer,
    encode_request,
    facts_answer,
)
from pymk.streams.state import popular_record_of


def degree_raw(user: int, degree: int, version: int) -> bytes:
    return degree_record(DegreeUpdate(user, degree, version, 1_000 + version, 1_000 + version, (0.5, 1.0, 2.0)))[1]


def test_records_of_users_not_held_are_dropped_and_a_read_asks_for_the_user(tmp_path: Path) -> None:
    held = UserGlobals(Settings(home=tmp_path, globals_mode="reachable"))
    changed: list[int] = []
    held.listeners.append(changed.append)
    held.merge_record(degree_raw(7, 3, 10))
    held.merge_record(profile_record(7, {"company": "Acme"}, {"company": 5})[1])
    assert held.records_dropped == 2 and held.describe_held()["records_kept"] == 0
    # the popular order comes from the partitions' lists their owners publish, not from the records dropped
    assert held.most_active(5) == []
    held.merge_record(popular_record(0, 1, [(7, 1.5, 3)], complete=True)[1])
    assert held.most_active(5) == [7] and held.describe_held()["records_kept"] == 0
    # a read of a user not answered: unknown, a miss, and the user is asked for
    assert held.degree(7) == (0, None) and held.profile(7) == (None, {}) and held.activity(7) is None
    assert held.misses == 3 and held.wanted == {7}
    # a record published while the question travels is kept ...
    held.merge_record(degree_raw(7, 4, 12))
    assert held.degree(7) == (0, None)  # ... but not read before the answer (its profile may be missing)
    # the owner's answer, older than that record: merged by version, the newer degree stays; nothing merged, but
    # the listeners hear of the user all the same (what was read of it before the answer were unknowns)
    changed.clear()
    assert held.merge_answer([7], [degree_raw(7, 3, 10)]) == 0 and changed == [7] and not held.wanted
    assert held.degree(7) == (4, 1_012) and held.profile(7) == (None, {})
    held.merge_record(profile_record(7, {"company": "Acme"}, {"company": 5})[1])
    assert held.profile(7)[0].company == "Acme"
    misses = held.misses
    held.merge_record(degree_raw(7, 5, 13))  # from now on the topic keeps it current
    assert held.degree(7)[0] == 5 and held.misses == misses
    # a user answered without records (the owner knows nothing of it) reads as unknown, without a miss
    held.degree(8)
    held.merge_answer([8], [])
    assert held.degree(8) == (0, None) and held.misses == misses + 1


def test_past_the_bound_the_users_answered_longest_ago_are_dropped_and_fetched_again(tmp_path: Path) -> None:
    held = UserGlobals(Settings(home=tmp_path, globals_mode="reachable", globals_held_max_users=3))
    changed: list[int] = []
    held.listeners.append(changed.append)
    for user in (1, 2, 3):
        held.degree(user)
    held.merge_answer([1, 2, 3], [degree_raw(user, user, 10) for user in (1, 2, 3)])
    held.degree(4)
    held.degree(5)
    changed.clear()
    held.merge_answer([4, 5], [degree_raw(user, user, 10) for user in (4, 5)])
    assert held.evicted == 2 and changed.count(1) == changed.count(2) == 1  # their reads are not kept current
    assert held.degree(3)[0] == 3 and held.degree(5)[0] == 5
    misses = held.misses
    assert held.degree(1) == (0, None) and held.misses == misses + 1 and held.wanted == {1}
    held.merge_record(degree_raw(2, 9, 11))  # a dropped user's record is not kept
    assert held.describe_held()["records_kept"] == 3
    # an answer larger than the bound is kept whole: the lists about to be ranked read all of it
    for user in (6, 7, 8, 9):
        held.degree(user)
    held.merge_answer([1, 6, 7, 8, 9], [])
    assert held.describe_held()["answered_users"] == 5 and held.degree(9) == (0, None)


def test_the_replicated_mode_holds_everyone_and_never_misses(tmp_path: Path) -> None:
    everyone = UserGlobals(Settings(home=tmp_path))
    everyone.merge_record(degree_raw(7, 3, 10))
    assert everyone.degree(7)[0] == 3 and everyone.degree(9) == (0, None)
    assert everyone.misses == 0 and not everyone.wanted and everyone.records_dropped == 0


def test_the_wire_round_trips() -> None:
    assert decode_request(encode_request([3, 1, 2])) == [3, 1, 2]
    records = [degree_raw(7, 3, 10), profile_record(7, {"company": "Acme"}, {"company": 5})[1]]
    answer = decode_answer(encode_answer(Answer([7, 8], records, [])))
    assert answer.answered == [7, 8] and list(map(json.loads, answer.records)) == list(map(json.loads, records))
    assert answer.embeddings == []


def test_a_worker_holding_reachable_globals_publishes_the_lists_of_one_holding_all(tmp_path: Path) -> None:
    """One worker owns partition 0 of two. Replicated, it reads partition 1's users from user-globals; reachable,
    it has dropped every record of the topic, and asks partition 1's owner for what its lists read."""
    world = build_world(tmp_path / "world", 3000, partitions=2, seed=5)
    now = world.event_time_ms
    users = sorted(world.owned.graph.local_users())[:10]
    replicated = world.refresher()
    expected = {user: replicated.rank(world.owned, user, now)[0].to_dict() for user in users}

    remote = world.states[1]
    owners_state = {1: remote}

    def owner(user: int):  # noqa: ANN202 - the peer's state_for
        return owners_state.get(world.partition_of(user))

    remote_users = sorted(set(remote.graph.local_users()))
    # the topic: every partition's records (the popular order reads them all)
    topic = facts_answer(sorted({u for s in world.states.values() for u in s.graph.local_users()}),
                            lambda user: world.states[world.partition_of(user)]).records
    settings = replace(world.settings, globals_mode="reachable")
    held = UserGlobals(settings)
    for raw in topic:  # the topic read in full: nobody's record kept
        held.merge_record(raw)
    assert held.describe_held()["records_kept"] == 0
    # the popular order: each partition's owner publishes its most active users
    for state in world.states.values():
        record = popular_record_of(state, [], settings.globals_popular_per_partition, now)
        assert record is not None
        held.merge_record(record[1])
    assert held.most_active(50) == world.globals.most_active(50)
    reachable_world = replace(world, settings=settings, globals=held)
    refresher = reachable_world.refresher()
    asked: list[list[int]] = []

    async def post(url: str, body: bytes, timeout_s: float) -> bytes:
        asked.append(decode_request(body))
        return encode_answer(facts_answer(decode_request(body), owner))

    refresher.remote_facts = RemoteFacts(held, reachable_world.state_of, lambda: ["http://peer"], post, 1.0)
    for user in users:
        world.owned.work.touch(user, now, None, True)
    published: dict[int, dict] = {}
    for _ in range(4):  # each round: the fetch (as before a slice), then the slice
        asyncio.run(refresher.fetch_facts())
        for recommendations, _ in refresher.refresh_due([world.owned], now, budget_s=60.0):
            published[recommendations.user] = recommendations.to_dict()
    for body in (*published.values(), *expected.values()):
        del body["generated_at"]
    assert published == expected
    # the first lists read users not held: they waited for the answer instead of publishing unknowns
    assert refresher.stats.lists_waiting_for_facts > 0 and asked and not held.wanted
    assert not world.owned.work.has_refreshes()
    described = refresher.remote_facts.describe()
    assert described["users_answered"] == described["answered_users"] == len(set().union(*map(set, asked)))
    assert 0 < described["answered_users"] <= len(remote_users)
    # what the owner answered is what its flushes published to the topic (the degree's ts apart: an answer dates
    # it by the user's latest register, as the owner's own pages do; a record by the event that changed it)
    for user in held._answered:
        assert held.degree(user)[0] == world.globals.degree(user)[0]
        assert held.activity(user) == world.globals.activity(user)
        assert held.profile(user) == world.globals.profile(user)
    assert described["records_kept"] <= 2 * described["answered_users"]  # a degree and a profile record each


def test_a_held_set_bounded_below_what_a_slice_reads_still_publishes_every_list(tmp_path: Path) -> None:
    """PYMK_GLOBALS_HELD_MAX_USERS below the remote users the owed lists read together (but above one list's), a
    stream going on: the slice stops at the first list that waits, so each fetch lets a list through; without that
    each answer past the bound evicted what the waiting lists needed (4 of these 8 lists in 60 rounds)."""
    world = build_world(tmp_path / "world", 3000, partitions=2, seed=5)
    now = world.event_time_ms
    users = sorted(world.owned.graph.local_users())[:8]
    expected = {user: world.refresher().rank(world.owned, user, now)[0].to_dict() for user in users}
    remote = world.states[1]
    # each list's remote users (what one ranking asks for, alone) and theirs together: the bound between the two
    probe_settings = replace(world.settings, globals_mode="reachable")
    needs = []
    for user in users:
        probe = UserGlobals(probe_settings)
        replace(world, settings=probe_settings, globals=probe).refresher().rank(world.owned, user, now)
        needs.append(set(probe.wanted))
    bound = max(map(len, needs)) + 20
    assert len(set().union(*needs)) > bound + 100  # the slice's lists together read more than it holds
    settings = replace(world.settings, globals_mode="reachable", globals_held_max_users=bound)
    held = UserGlobals(settings)
    for state in world.states.values():
        record = popular_record_of(state, [], settings.globals_popular_per_partition, now)
        assert record is not None
        held.merge_record(record[1])
    refresher = replace(world, settings=settings, globals=held).refresher()

    async def post(url: str, body: bytes, timeout_s: float) -> bytes:
        return encode_answer(facts_answer(decode_request(body),
                                          lambda user: remote if world.partition_of(user) == 1 else None))

    refresher.remote_facts = RemoteFacts(held, lambda user: world.owned if world.partition_of(user) == 0 else None,
                                         lambda: ["http://peer"], post, 1.0)
    published: dict[int, dict] = {}
    rounds = 0
    # a user touched every round (the stream goes on), a list or so ranked per slice (a short budget: at least one
    # list per slice), a fetch before each slice
    while len(published) < len(users) and rounds < 200:
        if rounds < len(users):
            world.owned.work.touch(users[rounds], now, None, True)
        rounds += 1
        asyncio.run(refresher.fetch_facts())
        for recommendations, _ in refresher.refresh_due([world.owned], now, budget_s=0.0):
            published[recommendations.user] = recommendations.to_dict()
    described = refresher.remote_facts.describe()
    assert described["evicted_users"] > 0, described  # the bound bit: the slice's lists read more than it holds
    assert len(published) == len(users), (rounds, described)
    for body in (*published.values(), *expected.values()):
        del body["generated_at"]
    assert published == expected


def test_an_embedding_that_read_a_user_not_held_waits_and_then_equals_the_replicated_one(tmp_path: Path) -> None:
    """GraphSAGE reads the degree and profile of the nodes it samples around a user: remote ones too. A batch that
    read one not held publishes nothing (its users stay due); retried, the users that waited go first and alone,
    so a newcomer in the batch cannot hold them back again; their vectors are a replicated worker's."""
    import numpy as np

    from pymk.index.embedder import salt_for_version

    world = build_world(tmp_path / "world", 400, partitions=2, seed=3)
    now = world.event_time_ms
    local = sorted(world.owned.graph.local_users())
    first, newcomers = local[:6], local[6:9]
    replicated = world.refresher()
    salt = salt_for_version(replicated.models.embedding_model)
    expected = {r.user: r.vector for r in replicated._embed(world.owned, first + newcomers, now, salt)}

    settings = replace(world.settings, globals_mode="reachable")
    held = UserGlobals(settings)
    reachable_world = replace(world, settings=settings, globals=held)
    refresher = reachable_world.refresher()

    def owner(user: int):  # noqa: ANN202 - the peer's state_for
        return world.states[1] if world.partition_of(user) == 1 else None

    async def post(url: str, body: bytes, timeout_s: float) -> bytes:
        return encode_answer(facts_answer(decode_request(body), owner))

    refresher.remote_facts = RemoteFacts(held, reachable_world.state_of, lambda: ["http://peer"], post, 1.0)
    assert refresher._embed(world.owned, first, now, salt) == []
    assert refresher.stats.embeddings_waiting_for_facts == len(first) and held.wanted
    asyncio.run(refresher.fetch_facts())
    records = refresher._embed(world.owned, first + newcomers, now, salt)  # the newcomers' nodes: not all held
    done = {r.user for r in records}
    assert set(first) <= done
    asyncio.run(refresher.fetch_facts())
    records += refresher._embed(world.owned, [u for u in first + newcomers if u not in done], now, salt)
    assert {r.user: r.vector for r in records}.keys() == expected.keys()
    for record in records:
        assert np.array_equal(record.vector, expected[record.user])


def test_a_partition_publishes_its_most_active_users_when_they_change(tmp_path: Path) -> None:
    world = build_world(tmp_path / "world", 300, partitions=2, seed=3)
    state = world.states[0]
    first = popular_record_of(state, [], 5, 1_000)
    assert first is not None and first[0] == b"t:0"
    body = json.loads(first[1])
    assert body["kind"] == "popular" and body["version"] == 1_000 and not body["complete"] and len(body["users"]) == 5
    assert [u for u, _, _ in body["users"]] == [
        u for u in world.globals.leaderboard.top(300) if world.partition_of(u) == 0][:5]
    assert popular_record_of(state, [], 5, 2_000) is None  # nothing moved: nothing sent
    outsider = next(u for u in sorted(state.graph.local_users()) if u not in {u for u, _, _ in body["users"]})
    later = world.event_time_ms + 86_400_000  # a burst of connections a day after the network's last event
    busy = DegreeUpdate(outsider, 50, 10**12, later, later, (90.0, 90.0, 90.0))
    second = popular_record_of(state, [busy], 5, 500)  # a wall clock behind the last version: one more than it
    assert second is not None
    body = json.loads(second[1])
    assert body["users"][0][0] == outsider and body["version"] == 1_001
