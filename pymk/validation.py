"""Turning raw Kafka message values into typed input events, or into a reason why not.

Pure code: no Kafka. The worker calls :func:`parse_event` on every message of the five input topics;
an :class:`Invalid` result goes to the dead-letter topic with ``reason``. Reason codes are stable (they
name the metrics counters); the text after the colon explains the case for a person.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from pymk.events import (
    MAX_USER_ID,
    ConnectionEvent,
    DismissalEvent,
    EngagementEvent,
    InputEvent,
    Profile,
    ProfileViewEvent,
    UserEvent,
)

# Every reason code the validator can give, in the order checks run.
REASON_CODES = (
    "oversize",
    "invalid_utf8",
    "invalid_json",
    "not_an_object",
    "missing_field",
    "wrong_type",
    "invalid_id",
    "self_connection",
    "unknown_action",
    "invalid_timestamp",
    "future_timestamp",
    "invalid_value",
    "unknown_topic",
)


# Nesting deeper than this is rejected before parsing. Events nest three levels (event, profile, skills); the
# limit leaves room for extra fields. Without it the outcome of deep input would depend on how much of Python's
# recursion limit the caller's stack already uses (the json scanner recurses in C and counts against it).
MAX_JSON_DEPTH = 64
# Longest applied string (profile fields, each skill): over-long strings are invalid_value.
MAX_TEXT_CHARS = 1000

_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
# Bracket bytes as +1 / -1 (int8), every other byte deleted: nesting depth is then a running sum.
_BRACKET_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_NOT_BRACKETS = bytes(range(256)).translate(None, b"[]{}")


@dataclass(frozen=True)
class Invalid:
    code: str
    detail: str

    @property
    def reason(self) -> str:
        return f"{self.code}: {self.detail}"


class _Reject(Exception):
    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.invalid = Invalid(code, detail)


def _reject_constant(name: str) -> Any:
    raise _Reject("invalid_json", f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Reject("invalid_json", f"number {text[:40]} overflows a double")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Parsers disagree on a repeated key (first or last wins), so a producer-side check and this worker could
    # read different ids from the same bytes: refuse the ambiguity instead of picking a side.
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Reject("invalid_json", f"key {key[:40]!r} appears more than once in an object")
            seen.add(key)
    return obj


def _too_deep(raw: bytes) -> bool:
    """Whether brackets outside JSON strings nest more than MAX_JSON_DEPTH levels (cheap for normal input:
    fewer opening brackets than the limit cannot nest deeper)."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_JSON_DEPTH:
        return False
    steps = _JSON_STRING.sub(b'""', raw).translate(_BRACKET_STEPS, _NOT_BRACKETS)
    # vectorised: a Python loop over 64 KiB of brackets took 10 ms a message, an easy way to slow a worker down
    return int(np.cumsum(np.frombuffer(steps, dtype=np.int8), dtype=np.int64).max(initial=0)) > MAX_JSON_DEPTH


def _text(value: str, name: str) -> str:
    """A string that will be stored and re-encoded: bounded, and encodable as UTF-8 (JSON's \\ud800 escape gives
    a lone surrogate, which is valid JSON but no character, and would fail when the state is written)."""
    if len(value) > MAX_TEXT_CHARS:
        raise _Reject("invalid_value", f"'{name}' is longer than {MAX_TEXT_CHARS} characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _Reject("invalid_value", f"'{name}' contains a lone surrogate at character {exc.start}") from None
    return value


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _field(obj: dict[str, Any], name: str) -> Any:
    if name not in obj:
        raise _Reject("missing_field", f"'{name}' is required")
    return obj[name]


def _user_id(obj: dict[str, Any], name: str) -> int:
    value = _field(obj, name)
    # bool is an int subclass in Python; JSON true is not an id.
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Reject("wrong_type", f"'{name}' must be an integer user id, got {_type_name(value)}")
    if not 0 <= value <= MAX_USER_ID:
        raise _Reject("invalid_id", f"'{name}'={value} is not a non-negative 64-bit integer")
    return value


def _timestamp(obj: dict[str, Any], now_ms: int, max_future_ms: int) -> int:
    value = _field(obj, "ts")
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Reject("invalid_timestamp", f"'ts' must be an integer (epoch ms), got {_type_name(value)}")
    if not 0 <= value <= MAX_USER_ID:
        raise _Reject("invalid_timestamp", f"'ts'={value} is out of range")
    if value > now_ms + max_future_ms:
        raise _Reject("future_timestamp", f"'ts'={value} is more than {max_future_ms} ms after now ({now_ms})")
    return value


def _optional_str(profile: dict[str, Any], name: str) -> str | None:
    value = profile.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _Reject("wrong_type", f"'profile.{name}' must be a string, got {_type_name(value)}")
    return _text(value, f"profile.{name}")


def _profile(obj: dict[str, Any]) -> Profile:
    raw = obj.get("profile", {})
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise _Reject("wrong_type", f"'profile' must be an object, got {_type_name(raw)}")
    skills = raw.get("skills")
    if skills is not None:
        if not isinstance(skills, list) or not all(isinstance(s, str) for s in skills):
            raise _Reject("wrong_type", "'profile.skills' must be a list of strings")
        if len(skills) > 500:
            raise _Reject("invalid_value", "'profile.skills' has more than 500 entries")
        skills = tuple(_text(s, "profile.skills[]") for s in skills)
    geo = raw.get("geo")
    if geo is not None:
        if (not isinstance(geo, list) or len(geo) != 2
                or not all(isinstance(x, int | float) and not isinstance(x, bool) for x in geo)):
            raise _Reject("wrong_type", "'profile.geo' must be [lat, lon] numbers")
        # Compared before float(): a JSON integer can be too large for a double (float() would raise).
        if not (-90 <= geo[0] <= 90 and -180 <= geo[1] <= 180):
            shown = ", ".join(str(x)[:30] for x in geo)
            raise _Reject("invalid_value", f"'profile.geo'=[{shown}] is not a valid latitude/longitude")
        geo = (float(geo[0]), float(geo[1]))
    return Profile(
        company=_optional_str(raw, "company"),
        school=_optional_str(raw, "school"),
        industry=_optional_str(raw, "industry"),
        title=_optional_str(raw, "title"),
        skills=skills,
        geo=geo,
    )


def _build(kind: str, obj: dict[str, Any], now_ms: int, max_future_ms: int) -> InputEvent:
    if kind == "connections":
        src, dst = _user_id(obj, "src"), _user_id(obj, "dst")
        action = _field(obj, "action")
        if not isinstance(action, str):
            raise _Reject("wrong_type", f"'action' must be a string, got {_type_name(action)}")
        if action not in ("add", "remove"):
            raise _Reject("unknown_action", f"'action'={action[:40]!r} is neither 'add' nor 'remove'")
        ts = _timestamp(obj, now_ms, max_future_ms)
        if src == dst:
            raise _Reject("self_connection", f"a user cannot connect to itself ({src})")
        return ConnectionEvent(src=src, dst=dst, action=action, ts=ts)
    if kind == "profile-views":
        viewer, viewed = _user_id(obj, "viewer"), _user_id(obj, "viewed")
        ts = _timestamp(obj, now_ms, max_future_ms)
        if viewer == viewed:
            raise _Reject("self_connection", f"a user viewing its own profile ({viewer}) is not a signal")
        return ProfileViewEvent(viewer=viewer, viewed=viewed, ts=ts)
    if kind == "dismissals":
        user, candidate = _user_id(obj, "user"), _user_id(obj, "candidate")
        ts = _timestamp(obj, now_ms, max_future_ms)
        if user == candidate:
            raise _Reject("self_connection", f"a user cannot dismiss itself ({user})")
        return DismissalEvent(user=user, candidate=candidate, ts=ts)
    if kind == "engagements":
        return EngagementEvent(user=_user_id(obj, "user"), item=_user_id(obj, "item"),
                               ts=_timestamp(obj, now_ms, max_future_ms))
    if kind == "users":
        user = _user_id(obj, "user")
        ts = _timestamp(obj, now_ms, max_future_ms)
        return UserEvent(user=user, ts=ts, profile=_profile(obj))
    raise _Reject("unknown_topic", f"no event type for topic kind {kind!r}")


def parse_event(kind: str, raw: bytes | None, now_ms: int, *, max_bytes: int = 64 * 1024,
                max_future_ms: int = 24 * 3600 * 1000) -> InputEvent | Invalid:
    """Parse one message value of the input topic ``kind`` (``connections``, ``users``, …)."""
    if raw is None:
        return Invalid("invalid_json", "the message has no value (null)")
    if len(raw) > max_bytes:
        return Invalid("oversize", f"{len(raw)} bytes is more than the {max_bytes}-byte limit")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Invalid("invalid_utf8", f"byte {exc.start} is not valid UTF-8")
    if _too_deep(raw):
        return Invalid("invalid_json", f"nested more than {MAX_JSON_DEPTH} levels deep")
    try:
        obj = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float,
                         object_pairs_hook=_unique_keys)
    except _Reject as rejected:
        return rejected.invalid
    except RecursionError:
        return Invalid("invalid_json", "nested too deeply")
    except ValueError as exc:  # JSONDecodeError, and ints longer than Python's digit limit
        return Invalid("invalid_json", str(exc)[:200])
    if not isinstance(obj, dict):
        return Invalid("not_an_object", f"the value is a JSON {_type_name(obj)}, not an object")
    try:
        return _build(kind, obj, now_ms, max_future_ms)
    except _Reject as rejected:
        return rejected.invalid
