"""Tier 1: the validator turns every class of bad input into a stable reason code."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pymk.events import (
    ConnectionEvent,
    DismissalEvent,
    EngagementEvent,
    Profile,
    ProfileViewEvent,
    UserEvent,
)
from pymk.validation import Invalid, parse_event

NOW = 1_700_000_000_000
DAY = 24 * 3600 * 1000


def parse(kind: str, value: object | bytes) -> object:
    raw = value if isinstance(value, bytes) else json.dumps(value).encode()
    return parse_event(kind, raw, NOW)


def code(kind: str, value: object | bytes) -> str:
    result = parse(kind, value)
    assert isinstance(result, Invalid), result
    return result.code


VALID = [
    ConnectionEvent(1, 2, "add", NOW),
    ConnectionEvent(2**63 - 1, 0, "remove", 0),
    ProfileViewEvent(5, 6, NOW + DAY),
    DismissalEvent(7, 8, 12),
    EngagementEvent(9, 10**12, 13),
    UserEvent(11, 14, Profile(company="Acme", school="MIT", industry="software", title="data engineer",
                              skills=("python", "sql"), geo=(37.4, -122.1))),
    UserEvent(12, 15),
]


@pytest.mark.parametrize("event", VALID, ids=lambda e: type(e).__name__)
def test_valid_events_round_trip(event: object) -> None:
    assert parse_event(event.KIND, event.to_json(), NOW) == event  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("kind", "raw", "expected"),
    [
        ("connections", b"x" * (64 * 1024 + 1), "oversize"),
        ("connections", b'{"src": 1, "dst": 2, "action": "add", "ts": 1, "x": "\xff\xfe"}', "invalid_utf8"),
        ("connections", b'{"src": 1, "dst": 2, "action": "add", "ts": 1', "invalid_json"),
        ("connections", b"", "invalid_json"),
        ("connections", b'{"src": NaN, "dst": 2, "action": "add", "ts": 1}', "invalid_json"),
        ("connections", b'{"src": 1e999, "dst": 2, "action": "add", "ts": 1}', "invalid_json"),
        ("connections", b"[" * 100_000 + b"]" * 100_000, "oversize"),
        ("connections", b"[" * 5_000 + b"]" * 5_000, "invalid_json"),
        ("connections", b"[1, 2]", "not_an_object"),
        ("connections", b'"text"', "not_an_object"),
        ("connections", b"null", "not_an_object"),
    ],
)
def test_malformed_bytes(kind: str, raw: bytes, expected: str) -> None:
    assert code(kind, raw) == expected


def test_none_value_is_dead_lettered() -> None:
    result = parse_event("connections", None, NOW)
    assert isinstance(result, Invalid) and result.code == "invalid_json"


@pytest.mark.parametrize(
    ("kind", "value", "expected"),
    [
        ("connections", {"dst": 2, "action": "add", "ts": 1}, "missing_field"),
        ("connections", {"src": 1, "dst": 2, "ts": 1}, "missing_field"),
        ("connections", {"src": 1, "dst": 2, "action": "add"}, "missing_field"),
        ("profile-views", {"viewer": 1, "ts": 1}, "missing_field"),
        ("users", {"ts": 1}, "missing_field"),
        ("connections", {"src": "1", "dst": 2, "action": "add", "ts": 1}, "wrong_type"),
        ("connections", {"src": 1.0, "dst": 2, "action": "add", "ts": 1}, "wrong_type"),
        ("connections", {"src": True, "dst": 2, "action": "add", "ts": 1}, "wrong_type"),
        ("connections", {"src": None, "dst": 2, "action": "add", "ts": 1}, "wrong_type"),
        ("connections", {"src": [1], "dst": 2, "action": "add", "ts": 1}, "wrong_type"),
        ("connections", {"src": {"a": 1}, "dst": 2, "action": "add", "ts": 1}, "wrong_type"),
        ("connections", {"src": 1, "dst": 2, "action": 1, "ts": 1}, "wrong_type"),
        ("connections", {"src": -1, "dst": 2, "action": "add", "ts": 1}, "invalid_id"),
        ("connections", {"src": 2**63, "dst": 2, "action": "add", "ts": 1}, "invalid_id"),
        ("connections", {"src": 10**30, "dst": 2, "action": "add", "ts": 1}, "invalid_id"),
        ("connections", {"src": 3, "dst": 3, "action": "add", "ts": 1}, "self_connection"),
        ("profile-views", {"viewer": 3, "viewed": 3, "ts": 1}, "self_connection"),
        ("dismissals", {"user": 3, "candidate": 3, "ts": 1}, "self_connection"),
        ("connections", {"src": 1, "dst": 2, "action": "follow", "ts": 1}, "unknown_action"),
        ("connections", {"src": 1, "dst": 2, "action": "add", "ts": "1"}, "invalid_timestamp"),
        ("connections", {"src": 1, "dst": 2, "action": "add", "ts": 1.5}, "invalid_timestamp"),
        ("connections", {"src": 1, "dst": 2, "action": "add", "ts": -5}, "invalid_timestamp"),
        ("connections", {"src": 1, "dst": 2, "action": "add", "ts": None}, "invalid_timestamp"),
        ("connections", {"src": 1, "dst": 2, "action": "add", "ts": NOW + DAY + 1}, "future_timestamp"),
        ("users", {"user": 1, "ts": 1, "profile": "x"}, "wrong_type"),
        ("users", {"user": 1, "ts": 1, "profile": {"company": 5}}, "wrong_type"),
        ("users", {"user": 1, "ts": 1, "profile": {"skills": "python"}}, "wrong_type"),
        ("users", {"user": 1, "ts": 1, "profile": {"geo": [1]}}, "wrong_type"),
        ("users", {"user": 1, "ts": 1, "profile": {"geo": [91.0, 0.0]}}, "invalid_value"),
    ],
)
def test_invalid_fields(kind: str, value: object, expected: str) -> None:
    assert code(kind, value) == expected


def test_reason_text_names_the_field() -> None:
    result = parse("connections", {"src": 1, "action": "add", "ts": 1})
    assert isinstance(result, Invalid)
    assert result.reason.startswith("missing_field:") and "dst" in result.reason


def test_null_profile_fields_mean_not_given() -> None:
    event = parse("users", {"user": 1, "ts": 1, "profile": {"company": None, "school": "X"}})
    assert event == UserEvent(1, 1, Profile(school="X"))


def test_extra_fields_are_allowed() -> None:
    assert parse("connections", {"src": 1, "dst": 2, "action": "add", "ts": 1, "source": "app"}) == \
        ConnectionEvent(1, 2, "add", 1)


@given(st.binary(max_size=300))
def test_any_bytes_give_an_event_or_a_reason(raw: bytes) -> None:
    for kind in ("connections", "profile-views", "dismissals", "engagements", "users"):
        result = parse_event(kind, raw, NOW)
        assert isinstance(result, Invalid) or kind == result.KIND  # type: ignore[union-attr]


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                    lambda children: st.lists(children) | st.dictionaries(st.text(), children), max_leaves=20))
def test_any_json_gives_an_event_or_a_reason(value: object) -> None:
    result = parse_event("connections", json.dumps(value).encode(), NOW)
    assert isinstance(result, Invalid | ConnectionEvent)


# ---- found by the hostile-input corpus (tests/hostile.py) --------------------------------------------------------

def test_geo_integer_too_large_for_a_double_is_invalid_value_not_a_crash() -> None:
    # float(10**400) raises OverflowError: this used to escape parse_event and stop the worker's agent
    raw = b'{"user": 1, "ts": 1, "profile": {"geo": [1' + b"0" * 400 + b', 0]}}'
    assert code("users", raw) == "invalid_value"
    assert code("users", {"user": 1, "ts": 1, "profile": {"geo": [0, -(10**30)]}}) == "invalid_value"


@pytest.mark.parametrize("field", ["company", "school", "industry", "title"])
def test_lone_surrogate_in_a_stored_string_is_invalid_value(field: str) -> None:
    # valid JSON, but no character: accepted, it failed later when the worker encoded the state to UTF-8
    raw = b'{"user": 1, "ts": 1, "profile": {"%s": "Acme \\ud800"}}' % field.encode()
    assert code("users", raw) == "invalid_value"
    assert code("users", b'{"user": 1, "ts": 1, "profile": {"skills": ["go", "\\udfff"]}}') == "invalid_value"


def test_surrogate_pairs_and_escapes_are_text() -> None:
    raw = b'{"\\u0075ser": 1, "ts": 1, "profile": {"company": "\\ud83d\\ude00 \\u00e9cole", "skills": ["\\u0041"]}}'
    event = parse("users", raw)
    assert event == UserEvent(1, 1, Profile(company="\U0001f600 \u00e9cole", skills=("A",)))
    assert parse("users", event.to_json()) == event  # type: ignore[union-attr]


@given(st.text(alphabet=st.characters(categories=["Cs", "Lu", "Ll", "Nd", "So"]), max_size=8))  # Cs: surrogates
def test_accepted_profile_text_always_encodes(text: str) -> None:
    raw = json.dumps({"user": 1, "ts": 1, "profile": {"title": text, "skills": [text]}}).encode()  # \\u escapes
    result = parse_event("users", raw, NOW)
    if not isinstance(result, Invalid):
        result.to_json()  # would raise UnicodeEncodeError on a lone surrogate


def test_long_skill_is_invalid_value() -> None:
    assert code("users", {"user": 1, "ts": 1, "profile": {"skills": ["x" * 1001]}}) == "invalid_value"
    assert parse("users", {"user": 1, "ts": 1, "profile": {"skills": ["x" * 1000]}}) == \
        UserEvent(1, 1, Profile(skills=("x" * 1000,)))


def test_duplicate_keys_are_invalid_json() -> None:
    # parsers disagree on which copy wins, so the bytes have no single meaning
    result = parse("connections", b'{"src": 1, "dst": 2, "src": 3, "action": "add", "ts": 1}')
    assert isinstance(result, Invalid) and result.code == "invalid_json" and "'src'" in result.detail
    assert code("users", b'{"user": 1, "ts": 1, "profile": {"title": "a", "title": "b"}}') == "invalid_json"


def _nested(depth: int) -> bytes:
    return b'{"src": 1, "dst": 2, "action": "add", "ts": 1, "x": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


def _parse_at_stack_depth(frames: int, raw: bytes) -> object:
    if frames == 0:
        return parse_event("connections", raw, NOW)
    return _parse_at_stack_depth(frames - 1, raw)


@pytest.mark.parametrize("depth", [3, 64, 65, 500, 990, 10_000])
def test_nesting_outcome_does_not_depend_on_the_callers_stack(depth: int) -> None:
    # The json scanner recursion counts against Python's limit, so without a fixed depth limit the same bytes
    # were accepted from a shallow stack and rejected from a deep one (a worker's agent runs deep in asyncio).
    shallow = _parse_at_stack_depth(0, _nested(depth))
    deep = _parse_at_stack_depth(800, _nested(depth))
    assert shallow == deep
    assert isinstance(shallow, Invalid) == (depth > 64)


def test_brackets_inside_strings_are_not_nesting() -> None:
    raw = json.dumps({"src": 1, "dst": 2, "action": "add", "ts": 1, "note": "[{" * 500 + '\\"[' * 50}).encode()
    assert parse("connections", raw) == ConnectionEvent(1, 2, "add", 1)
