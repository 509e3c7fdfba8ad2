"""Tier 1: profile similarity on hand-computed cases, and the profile state: per-field last-writer-wins by ts,
deterministic ties, idempotent, independent of arrival order, persisted."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pymk.events import Profile, UserEvent
from pymk.features.profile import (
    ProfileStore,
    geo_distance_km,
    merge_profile,
    normalise_text,
    profile_feature_timestamps,
    profile_features,
    same_company_current,
    same_industry,
    same_school,
    skill_jaccard_sim,
    title_cosine_sim,
    title_tokens,
    tokenise,
)
from pymk.features.storage import DictRowStore, RocksRowStore

PARIS = (48.8566, 2.3522)
LONDON = (51.5074, -0.1278)


# ---- text ----------------------------------------------------------------------------------------------------
def test_normalise_text() -> None:
    assert normalise_text("  ACME\t Corp \n") == "acme corp"
    assert normalise_text("Straße") == "strasse"  # casefold, not lower
    assert normalise_text("Cafe\u0301") == normalise_text("Café")  # decomposed == composed
    assert normalise_text("") == ""
    assert normalise_text(None) == ""


def test_tokenise_titles() -> None:
    assert tokenise("Senior Software-Engineer, Backend") == ["senior", "software", "engineer", "backend"]
    assert title_tokens("Head of Sales & Marketing") == ["head", "sales", "marketing"]
    assert title_tokens(None) == []


# ---- similarity ------------------------------------------------------------------------------------------------
def test_same_company_school_industry() -> None:
    a = Profile(company="ACME  Corp", school="MIT", industry="Software")
    b = Profile(company="acme corp", school="Stanford", industry=" software ")
    assert same_company_current(a, b) == 1
    assert same_school(a, b) == 0
    assert same_industry(a, b) == 1
    assert same_company_current(a, None) == 0
    assert same_company_current(None, None) == 0
    assert same_company_current(Profile(), Profile()) == 0  # two missing fields are not a match
    assert same_company_current(Profile(company=" "), Profile(company="")) == 0  # nor two blank ones


def test_skill_jaccard() -> None:
    a = Profile(skills=("Python", "SQL", "Go"))
    b = Profile(skills=("python", "Rust", " sql "))
    assert skill_jaccard_sim(a, b) == pytest.approx(2 / 4)  # {python, sql} / {python, sql, go, rust}
    assert skill_jaccard_sim(a, a) == 1.0
    assert skill_jaccard_sim(a, Profile(skills=())) == 0.0
    assert skill_jaccard_sim(a, Profile()) == 0.0
    assert skill_jaccard_sim(a, None) == 0.0
    assert skill_jaccard_sim(Profile(skills=("A", "a", "b")), Profile(skills=("a",))) == pytest.approx(1 / 2)


def test_title_cosine() -> None:
    def cos(x: str | None, y: str | None) -> float:
        return title_cosine_sim(Profile(title=x), Profile(title=y))

    assert cos("Senior Software Engineer", "software  ENGINEER") == pytest.approx(2 / math.sqrt(6))
    assert cos("Head of Sales", "VP of Sales") == pytest.approx(1 / 2)  # "of" is a stop word
    assert cos("data data engineer", "Data") == pytest.approx(2 / math.sqrt(5))  # counts, not sets
    assert cos("Nurse", "Nurse") == 1.0
    assert cos("Nurse", "Teacher") == 0.0
    assert cos("Nurse", None) == 0.0
    assert cos("of the", "of the") == 0.0  # no tokens left
    assert title_cosine_sim(None, Profile(title="Nurse")) == 0.0


def test_geo_distance() -> None:
    paris, london = Profile(geo=PARIS), Profile(geo=LONDON)
    d = geo_distance_km(paris, london)
    assert d is not None and abs(d - 343.5) < 1.0
    assert geo_distance_km(london, paris) == pytest.approx(d)
    assert geo_distance_km(paris, paris) == 0.0
    antipodal = geo_distance_km(Profile(geo=(0.0, 0.0)), Profile(geo=(0.0, 180.0)))
    assert antipodal == pytest.approx(math.pi * 6371.0088)
    assert geo_distance_km(paris, Profile()) is None
    assert geo_distance_km(None, paris) is None


def test_profile_features_and_timestamps() -> None:
    a = Profile(company="Acme", title="Data Engineer", skills=("sql",), geo=PARIS)
    b = Profile(company="acme", title="engineer", skills=("SQL", "go"))
    features = profile_features(a, b)
    assert features["same_company_current"] == 1
    assert features["same_school"] == 0
    assert features["skill_jaccard_sim"] == pytest.approx(0.5)
    assert features["title_cosine_sim"] == pytest.approx(1 / math.sqrt(2))
    assert features["geo_distance_km"] is None
    stamps = profile_feature_timestamps({"company": 5, "geo": 7}, {"company": 9, "title": 3})
    assert stamps["same_company_current"] == 9
    assert stamps["geo_distance_km"] == 7
    assert stamps["title_cosine_sim"] == 3
    assert stamps["same_school"] is None


# ---- merge ---------------------------------------------------------------------------------------------------
def test_merge_profile_updates_only_given_fields() -> None:
    old = Profile(company="Acme", school="MIT", skills=("python",), geo=PARIS)
    merged = merge_profile(old, Profile(company="Globex", skills=()))
    assert merged == Profile(company="Globex", school="MIT", skills=(), geo=PARIS)  # () is given: cleared list
    assert merge_profile(old, Profile()) == old
    assert merge_profile(None, Profile(title="Nurse")) == Profile(title="Nurse")


# ---- store ---------------------------------------------------------------------------------------------------
def test_store_lww_per_field_with_a_late_older_update() -> None:
    store = ProfileStore(DictRowStore())
    assert store.profile(1) is None and store.signed_up_at(1) is None
    assert store.apply(UserEvent(1, 100, Profile(company="Acme", school="MIT", title="Engineer")))
    assert store.apply(UserEvent(1, 300, Profile(company="Globex")))
    # An update from ts 200 arrives late: it loses "company" (300 is newer) but wins "title" (100 is older).
    assert store.apply(UserEvent(1, 200, Profile(company="Initech", title="Manager", geo=PARIS)))
    assert store.profile(1) == Profile(company="Globex", school="MIT", title="Manager", geo=PARIS)
    assert store.field_timestamps(1) == {"company": 300, "school": 100, "title": 200, "geo": 200}
    assert store.signed_up_at(1) == 100
    assert store.last_changed(1) == 300
    # a sign-up that arrives after the updates moves the sign-up time back but changes no newer field
    assert store.apply(UserEvent(1, 50, Profile(company="Old", skills=("x",))))
    assert store.signed_up_at(1) == 50
    assert store.profile(1) == Profile(company="Globex", school="MIT", title="Manager", skills=("x",), geo=PARIS)
    assert store.field_timestamps(1)["skills"] == 50


def test_store_is_idempotent() -> None:
    store = ProfileStore(DictRowStore())
    event = UserEvent(7, 10, Profile(company="Acme", skills=("a", "b"), geo=(1, 2)))
    assert store.apply(event)
    store.flush()
    assert not store.apply(event)
    assert store.dirty_rows() == ({}, [])
    assert not store.apply(UserEvent(7, 10, Profile(geo=(1.0, 2.0))))  # the same value, written as floats
    assert not store.apply(UserEvent(7, 20, Profile()))  # an empty later update changes nothing
    assert store.profile(7) == Profile(company="Acme", skills=("a", "b"), geo=(1.0, 2.0))


def test_equal_ts_resolves_the_same_whatever_the_order() -> None:
    e1 = UserEvent(3, 10, Profile(company="Acme", title="Engineer"))
    e2 = UserEvent(3, 10, Profile(company="Globex", skills=("go",)))
    results = []
    for events in ([e1, e2], [e2, e1]):
        store = ProfileStore(DictRowStore())
        for event in events:
            store.apply(event)
        results.append((store.profile(3), store.field_timestamps(3)))
    assert results[0] == results[1]
    assert results[0][0] == Profile(company="Globex", title="Engineer", skills=("go",))  # '"Globex"' > '"Acme"'


def test_new_user_with_an_empty_profile_is_recorded() -> None:
    store = ProfileStore(DictRowStore())
    assert store.apply(UserEvent(5, 42))
    assert store.profile(5) == Profile()
    assert store.signed_up_at(5) == 42
    assert store.field_timestamps(5) == {}
    assert list(store.local_users()) == [5]


def test_store_survives_flush_and_reopen_from_rocksdb(tmp_path: Path) -> None:
    rocks = RocksRowStore(tmp_path / "profiles")
    store = ProfileStore(rocks)
    store.apply(UserEvent(1, 100, Profile(company="Acme", skills=("python", "sql"), geo=PARIS)))
    store.apply(UserEvent(2, 50, Profile(title="Nurse")))
    store.apply(UserEvent(1, 200, Profile(title="CTO")))
    assert store.flush() == 2
    expected = {u: (store.profile(u), store.field_timestamps(u), store.signed_up_at(u)) for u in (1, 2)}
    rocks.close()
    reopened = ProfileStore(RocksRowStore(tmp_path / "profiles"))
    assert {u: (reopened.profile(u), reopened.field_timestamps(u), reopened.signed_up_at(u))
            for u in (1, 2)} == expected
    assert not reopened.apply(UserEvent(1, 100, Profile(company="Acme")))  # still idempotent after reload
    assert sorted(reopened.local_users()) == [1, 2]
    reopened.store.close()


# ---- any order, any duplicates -----------------------------------------------------------------------------------
profiles = st.builds(
    Profile,
    company=st.sampled_from([None, "Acme", "acme", "Globex"]),
    school=st.sampled_from([None, "MIT", "ETH"]),
    industry=st.sampled_from([None, "software"]),
    title=st.sampled_from([None, "Engineer", "Senior Engineer"]),
    skills=st.sampled_from([None, (), ("python",), ("go", "sql")]),
    geo=st.sampled_from([None, PARIS, LONDON]),
)
user_events = st.lists(st.builds(UserEvent, user=st.integers(0, 3), ts=st.integers(0, 6), profile=profiles),
                       max_size=25)


def _json(value: object) -> str:
    """The documented tie-break: compact JSON of the value (tuples as lists)."""
    return json.dumps(list(value) if isinstance(value, tuple) else value, separators=(",", ":"), ensure_ascii=False)


def _oracle(events: list[UserEvent]) -> dict[int, tuple[dict[str, object], dict[str, int], int]]:
    """Per user: field → winning value, field → its ts, sign-up ts; the winner is the highest (ts, JSON)."""
    out: dict[int, tuple[dict[str, object], dict[str, int], int]] = {}
    for event in set(events):
        values, stamps, signup = out.setdefault(event.user, ({}, {}, event.ts))
        out[event.user] = (values, stamps, min(signup, event.ts))
        for name in Profile.FIELDS:
            value = getattr(event.profile, name)
            if value is None:
                continue
            if name not in stamps or (event.ts, _json(value)) > (stamps[name], _json(values[name])):
                values[name], stamps[name] = value, event.ts
    return out


@settings(max_examples=150, deadline=None)
@given(events=user_events, seed=st.integers(0, 10**6))
def test_any_order_and_duplicates_give_the_oracle(events: list[UserEvent], seed: int) -> None:
    rng = random.Random(seed)
    stream = events + [e for e in events if rng.random() < 0.3]
    rng.shuffle(stream)
    store = ProfileStore(DictRowStore(), max_cached_rows=rng.choice([0, 100]))
    for event in stream:
        store.apply(event)
        if rng.random() < 0.2:
            store.flush()  # with max_cached_rows=0 every flush drops the cache: rows must round-trip
    expected = _oracle(events)
    for user in range(4):
        if user not in expected:
            assert store.profile(user) is None
            continue
        values, stamps, signup = expected[user]
        assert store.profile(user) == Profile(**values)
        assert store.field_timestamps(user) == stamps
        assert store.signed_up_at(user) == signup


def test_changed_users_are_taken_once_and_seen_again_after_a_new_change() -> None:
    store = ProfileStore(DictRowStore())
    store.apply(UserEvent(7, 10, Profile(company="Acme")))
    assert store.take_changed_users() == {7}
    assert store.take_changed_users() == set()  # taken, though not flushed
    assert not store.apply(UserEvent(7, 10, Profile(company="Acme")))
    assert store.take_changed_users() == set()  # nothing changed
    store.apply(UserEvent(7, 20, Profile(title="Engineer")))
    assert store.take_changed_users() == {7}
