"""The worker's table of Stage 2 reads (streams/user_facts.py): the same values as reading each user, read
again only after an invalidation. Pure, no broker."""

from __future__ import annotations

import numpy as np

from pymk.events import Profile
from pymk.streams.user_facts import Activity, UserFacts


class World:
    def __init__(self) -> None:
        self.degree: dict[int, int] = {}
        self.activity: dict[int, Activity] = {}
        self.profile: dict[int, Profile | None] = {}
        self.reads: list[int] = []

    def facts(self, user: int) -> tuple[int, Activity, Profile | None]:
        self.reads.append(user)
        return self.degree.get(user, 0), self.activity.get(user), self.profile.get(user)


def expected(world: World, users: list[int]) -> tuple[list[int], list[Profile | None], np.ndarray, np.ndarray]:
    values = np.array([(world.activity.get(u) or ((0.0, 0.0, 0.0), 0))[0] for u in users]).reshape(-1, 3)
    anchors = np.array([(world.activity.get(u) or ((0.0, 0.0, 0.0), 0))[1] for u in users], np.int64)
    return [world.degree.get(u, 0) for u in users], [world.profile.get(u) for u in users], values, anchors


def check(facts: UserFacts, world: World, users: list[int], held: World | None = None) -> None:
    """The table gives ``world``'s facts (``held``'s, when given: what it read before the world changed)."""
    degrees, profiles, values, anchors = expected(held or world, users)
    assert facts.degrees(users).tolist() == degrees
    assert facts.profiles(users) == profiles
    table = facts.activity(users)
    assert np.array_equal(table.values, values) and np.array_equal(table.anchors, anchors)
    assert table.known.tolist() == [(held or world).activity.get(u) is not None for u in users]
    ids = np.array(users, np.int64)
    # the profile cache's identity test (ProfileIdentitySource): each id() is that of the held profile object
    assert facts.profile_identities_of(ids).tolist() == [id(p) for p in facts.profiles_of(ids)]


def test_values_are_read_once_until_invalidated() -> None:
    world = World()
    for u in range(3000):  # more than the initial capacity: the arrays grow
        world.degree[u] = u % 17
        if u % 3:
            world.activity[u] = ((u * 0.5, u * 0.25, 1.0), 1_000 + u)
        if u % 5:
            world.profile[u] = Profile(company=f"c{u % 7}")
    facts = UserFacts(world.facts, capacity=16)
    users = list(range(0, 3000, 2)) + [5, 5, 10**12]  # repeats and a user nobody knows
    check(facts, world, users)
    reads = len(world.reads)
    check(facts, world, users)
    assert len(world.reads) == reads  # all valid: nothing read again

    before = World()
    before.degree, before.activity, before.profile = dict(world.degree), dict(world.activity), dict(world.profile)
    world.degree[4], world.activity[4], world.profile[4] = 99, ((7.0, 7.0, 7.0), 5), None
    world.degree[6] = 1
    check(facts, world, users, held=before)  # not invalidated yet: the values as read
    facts.invalidate([4, 6, 123456])
    world.degree[6] = 2
    check(facts, world, users)  # read again: the new values
    assert sorted(world.reads[reads:]) == [4, 6]
    facts.clear()
    check(facts, world, users)
    assert len(facts) == len(set(users))
