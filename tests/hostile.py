"""A seeded corpus of hostile messages for the five input topics, each with the outcome the contract requires.

Every message says what must happen to it: ``expected`` is the dead-letter reason code it must get, or ``None``
when it is valid however odd it looks (a key that names another user, no key, ``"profile": null``, escaped
field names, a value of exactly the size limit, …) and must be applied as ``event``. The expected codes are
written down from the contract (``docs/contract.md``, ``docs/architecture.md`` "Validation and dead letters")
and the order in which checks run (size, UTF-8, JSON, object, then fields in the order of the event), not
computed by the validator, so the corpus tests it. Pure code: no Kafka.

Cases (each appears about equally often; the first id field named by a kind is checked first):
random bytes, random text, truncated JSON, trailing garbage, a byte-order mark, empty values and tombstones,
arrays and scalars instead of objects, missing fields, null everywhere, wrong types, floats / strings / nested
garbage / booleans as ids, negative and huge ids (> 2^63, 1e400, 5,000-digit literals), NaN and Infinity,
invalid UTF-8 (random, overlong forms, encoded surrogates, cut sequences), 1 MB payloads, duplicate keys, deep
nesting (up to 10,000 levels), lone surrogate escapes in stored text, bad timestamps, unknown actions,
self-connections and out-of-range profile values.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pymk.events import (
    MAX_USER_ID,
    ConnectionEvent,
    DismissalEvent,
    EngagementEvent,
    InputEvent,
    Profile,
    ProfileViewEvent,
    UserEvent,
    user_key,
)
from pymk.settings import INPUT_KINDS

DAY_MS = 24 * 3600 * 1000
ITEM_BASE = 10**9  # content items live in their own id range, as in pymk.synthetic

# The id fields of each kind in the order the validator checks them, then whether a self-reference is invalid.
ID_FIELDS: dict[str, tuple[str, ...]] = {
    "connections": ("src", "dst"),
    "profile-views": ("viewer", "viewed"),
    "dismissals": ("user", "candidate"),
    "engagements": ("user", "item"),
    "users": ("user",),
}
SELF_REFERENCE_INVALID = ("connections", "profile-views", "dismissals")


@dataclass(frozen=True)
class HostileMessage:
    kind: str  # the input topic kind (``connections``, …)
    key: bytes | None
    value: bytes | None  # None: a tombstone (a message without value)
    expected: str | None  # the dead-letter reason code, or None: valid, must be applied as ``event``
    case: str  # which kind of hostility, for messages and counts
    event: InputEvent | None = None

    @property
    def bad(self) -> bool:
        return self.expected is not None


class _Maker:
    """Builds base events and their JSON with controlled mutations; hands out distinct timestamps."""

    def __init__(self, rng: random.Random, users: Sequence[int], now_ms: int, max_bytes: int) -> None:
        self.rng = rng
        self.users = list(users)
        self.now_ms = now_ms
        self.max_bytes = max_bytes
        self._next_ts = now_ms - 30 * DAY_MS

    def ts(self) -> int:
        self._next_ts += self.rng.randint(1, 1000)
        return self._next_ts

    def user(self) -> int:
        return self.rng.choice(self.users)

    def pair(self) -> tuple[int, int]:
        a, b = self.rng.sample(self.users, 2)
        return a, b

    def key(self) -> bytes | None:
        roll = self.rng.random()
        if roll < 0.8:
            return user_key(self.user())
        if roll < 0.9:
            return None
        return self.rng.randbytes(self.rng.randint(0, 12))

    def profile(self) -> dict[str, Any]:
        rng = self.rng
        fields: dict[str, Any] = {
            "company": rng.choice(["Acme", "Globex", "Initech", "Ümlaut GmbH", "株式会社"]),
            "school": rng.choice(["MIT", "ETH Zürich", "Sorbonne", None]),
            "industry": rng.choice(["software", "finance", "healthcare"]),
            "title": rng.choice(["data engineer", "nurse", "chef de projet", "🚀 founder"]),
            "skills": rng.sample(["python", "sql", "go", "rust", "kafka", "audit"], rng.randint(0, 4)),
            "geo": [round(rng.uniform(-90, 90), 4), round(rng.uniform(-180, 180), 4)],
        }
        return {k: v for k, v in fields.items() if v is not None and rng.random() < 0.8}

    def base(self, kind: str) -> dict[str, Any]:
        """A valid event object of this kind (ids distinct where a self-reference is invalid)."""
        a, b = self.pair()
        ts = self.ts()
        if kind == "connections":
            return {"src": a, "dst": b, "action": self.rng.choice(["add", "remove"]), "ts": ts}
        if kind == "profile-views":
            return {"viewer": a, "viewed": b, "ts": ts}
        if kind == "dismissals":
            return {"user": a, "candidate": b, "ts": ts}
        if kind == "engagements":
            return {"user": a, "item": ITEM_BASE + self.rng.randrange(50), "ts": ts}
        return {"user": a, "ts": ts, "profile": self.profile()}


def event_of(kind: str, obj: dict[str, Any]) -> InputEvent:
    """The event a valid object of this kind stands for (what the validator must produce)."""
    if kind == "connections":
        return ConnectionEvent(obj["src"], obj["dst"], obj["action"], obj["ts"])
    if kind == "profile-views":
        return ProfileViewEvent(obj["viewer"], obj["viewed"], obj["ts"])
    if kind == "dismissals":
        return DismissalEvent(obj["user"], obj["candidate"], obj["ts"])
    if kind == "engagements":
        return EngagementEvent(obj["user"], obj["item"], obj["ts"])
    raw = obj.get("profile") or {}
    return UserEvent(obj["user"], obj["ts"], Profile(
        company=raw.get("company"), school=raw.get("school"), industry=raw.get("industry"), title=raw.get("title"),
        skills=None if raw.get("skills") is None else tuple(raw["skills"]),
        geo=None if raw.get("geo") is None else (float(raw["geo"][0]), float(raw["geo"][1]))))


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _with_literal(obj: dict[str, Any], field: str, literal: str) -> bytes:
    """The object's JSON with ``field`` set to a raw JSON literal (NaN, 1e400, …), which json.dumps won't write."""
    marker = "\u0000MARK\u0000"
    return _dumps({**obj, field: marker}).replace(_dumps(marker), literal.encode())


# ---- bad cases: (maker, kind) → (value, expected code) -----------------------------------------------------------
BadCase = Callable[[_Maker, str], tuple[bytes | None, str]]


def _random_bytes(m: _Maker, kind: str) -> tuple[bytes | None, str]:
    data = bytearray(m.rng.randbytes(m.rng.randint(0, 300)))
    data.insert(m.rng.randint(0, len(data)), 0xFF)  # 0xFF never occurs in UTF-8
    return bytes(data), "invalid_utf8"


def _random_text(m: _Maker, kind: str) -> tuple[bytes | None, str]:
    alphabet = string.printable + "{}[]:,\"\\"
    while True:
        text = "{" + "".join(m.rng.choice(alphabet) for _ in range(m.rng.randint(0, 200)))
        try:
            json.loads(text)
        except ValueError:
            return text.encode(), "invalid_json"


def _truncated(m: _Maker, kind: str) -> tuple[bytes | None, str]:
    full = _dumps(m.base(kind))
    cut = full[:m.rng.randrange(1, len(full))]  # a proper prefix of an object is never JSON
    try:
        cut.decode("utf-8")
    except UnicodeDecodeError:
        return cut, "invalid_utf8"  # cut inside a multi-byte character: UTF-8 is checked before JSON
    return cut, "invalid_json"


def _trailing_garbage(m: _Maker, kind: str) -> tuple[bytes | None, str]:
    full = _dumps(m.base(kind))
    tail = m.rng.choice([b"x", b",", b"}", b"]", full, b" null", b"\x00"])
    return full + tail, "invalid_json"


def _byte_order_mark(m: _Maker, kind: str) -> tuple[bytes | None, str]:
    return b"\xef\xbb\xbf" + _dumps(m.base(kind)), "invalid_json"


def _empty(m: _Maker, kind: str) -> tuple[bytes | None, str]:
    return m.rng.choice([b"", b" ", b"\n", b"\t \r\n", None]), "invalid_json"


def _not_an_object(m: _Maker, kind: str) -> tuple[bytes | None, str]:
    choices = [b"[]", b"[1,2]", b"5", b"-1", b"1.5", b'"text"', b"true", b"false", b"null",
               _dumps([m.base(kind)]), _dumps([[[m.base(kind)]]]), b'"{\\"src\\":1}"']
    return m.rng.choice(choices), "not_an_object"


def _missing_field(m: _Maker, kind: str) -> tuple[bytes | None, str]:
    obj = m.base(kind)
    required = [*ID_FIELDS[kind], "ts"] + (["action"] if kind == "connections" else [])
    roll = m.rng.random()
    if roll < 0.15:
        return b"{}", "missing_field"
    if roll < 0.3:  # nested garbage but none of the fields
        return _dumps({"data": obj, "x": [{"y": {"z": None}}]}), "missing_field"
    del obj[m.rng.choice(required)]
    return _dumps(obj), "missing_field"


def _null_everywhere(m: _Maker, kind: str) -> tuple[bytes | None, str]:
    obj = m.base(kind)
    nulled = {k: None for k in obj}
    if m.rng.random() < 0.5:
        return _dumps(nulled), "wrong_type"  # the first id field is checked first: null is not an id
    field = m.rng.choice(sorted(obj.keys() - {"profile"}))
    obj[field] = None
    return _dumps(obj), "invalid_timestamp" if field == "ts" else "wrong_type"


_NOT_INTEGERS: tuple[Any, ...] = (1.5, 2.0, -0.5, 1e3, 1.7e308, "12", "", "abc", "\u0661\u0662", True, False,
                                  [1], [], {"id": 1}, {"a": [1, {"b": None}]}, [[[[[7]]]]])


def _id_wrong_type(m: _Maker, kind: str) -> tuple[bytes | None, str]:
    obj = m.base(kind)
    obj[m.rng.choice(ID_FIELDS[kind])] = m.rng.choice(_NOT_INTEGERS)
    return _dumps(obj), "wrong_type"


def _id_out_of_range(m: _Maker, kind: str) -> tuple[bytes | None, str]:
    obj = m.base(kind)
    value = m.rng.choice([-1, -2**63, -(10**40), 2**63, 2**63 + m.rng.randrange(10**6), 2**64,
                          10 ** m.rng.randint(19, 300), MAX_USER_ID + 1])
    obj[m.rng.choice(ID_FIELDS[kind])] = value
    return _dumps(obj), "invalid_id"


def _unparseable_number(m: _Maker, kind: str) -> tuple[bytes | None, str]:
    """Literals JSON parsing must refuse: NaN/Infinity (not JSON), numbers beyond a double, 5,000-digit integers."""
    obj = m.base(kind)
    literal = m.rng.choice(["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1.8e308", "2e999999",
                            "9" * 5000])
    field = m.rng.choice([*ID_FIELDS[kind], "ts", "extra"])
    return _with_literal(obj, field, literal), "invalid_json"


def _invalid_utf8_in_text(m: _Maker, kind: str) -> tuple[bytes | None, str]:
    # a broken pair, an overlong "/", encoded surrogates, beyond U+10FFFF, a 5-byte form, a lone continuation,
    # a cut sequence, a byte UTF-8 never uses
    bad = m.rng.choice([b"\xc3\x28", b"\xc0\xaf", b"\xe0\x80\xaf", b"\xed\xa0\x80", b"\xed\xbf\xbf",
                        b"\xf5\x80\x80\x80", b"\xf8\x88\x80\x80\x80", b"\x80", b"\xe2\x82", b"\xfe"])
    full = _dumps({**m.base(kind), "note": "\u0000MARK\u0000"})
    return full.replace(b"\\u0000MARK\\u0000", b"ok " + bad + b" ok"), "invalid_utf8"


def _oversize(m: _Maker, kind: str) -> tuple[bytes | None, str]:
    size = m.rng.choice([m.max_bytes + 1, m.max_bytes + 1, 2 * m.max_bytes, 1_000_000, 1_048_576])
    filler = m.rng.choice(["json", "bytes", "nesting"])
    if filler == "json":
        head = _dumps({**m.base(kind), "pad": ""})[:-2]
        return head + b"x" * (size - len(head) - 2) + b'"}', "oversize"
    if filler == "bytes":
        return b"\xff" * size, "oversize"  # size is checked before anything else
    return b"[" * (size // 2) + b"]" * (size - size // 2), "oversize"


def _duplicate_keys(m: _Maker, kind: str) -> tuple[bytes | None, str]:
    obj = m.base(kind)
    field = m.rng.choice([*ID_FIELDS[kind], "ts"])
    text = _dumps(obj).decode()
    repeated = json.dumps(m.user() if field != "ts" else m.ts())
    return (text[:-1] + f',"{field}":{repeated}}}').encode(), "invalid_json"


def _deep_nesting(m: _Maker, kind: str) -> tuple[bytes | None, str]:
    depth = m.rng.choice([65, 100, 1_000, 5_000, 10_000])
    shape = m.rng.choice(["array", "object", "unclosed", "field"])
    if shape == "array":
        return b"[" * depth + b"]" * depth, "invalid_json"
    if shape == "object":
        return b'{"a":' * depth + b"1" + b"}" * depth, "invalid_json"
    if shape == "unclosed":
        return b"[" * depth, "invalid_json"
    return _with_literal(m.base(kind), "extra", "[" * depth + "]" * depth), "invalid_json"


def _bad_timestamp(m: _Maker, kind: str) -> tuple[bytes | None, str]:
    obj = m.base(kind)
    if m.rng.random() < 0.25:
        obj["ts"] = m.now_ms + m.rng.choice([2 * DAY_MS, 365 * DAY_MS, 2**62])
        return _dumps(obj), "future_timestamp"
    obj["ts"] = m.rng.choice(["1700000000000", 1.7e12, 1700000000000.5, -1, -(2**63), 2**63, 2**70, True,
                              None, [1], {"ms": 1}, ""])
    return _dumps(obj), "invalid_timestamp"


def _self_reference(m: _Maker, kind: str) -> tuple[bytes | None, str]:
    obj = m.base(kind)
    first, second = ID_FIELDS[kind]
    obj[second] = obj[first]
    return _dumps(obj), "self_connection"


def _bad_action(m: _Maker, kind: str) -> tuple[bytes | None, str]:
    obj = m.base(kind)
    if m.rng.random() < 0.3:
        obj["action"] = m.rng.choice([1, None, ["add"], {"add": True}, True])
        return _dumps(obj), "wrong_type"
    obj["action"] = m.rng.choice(["ADD", "Add", "delete", "", " add", "add\u0000", "\ud800", "a" * 10_000])
    return json.dumps(obj).encode(), "unknown_action"  # ensure_ascii: the lone surrogate as a \\ud800 escape


def _bad_profile(m: _Maker, kind: str) -> tuple[bytes | None, str]:
    obj = m.base(kind)
    profile = dict(obj["profile"])
    wrong_type: list[tuple[str, Any]] = [
        ("company", 5), ("title", ["x"]), ("school", {"name": "MIT"}), ("industry", True),
        ("skills", "python"), ("skills", [1, 2]), ("skills", ["ok", None]), ("skills", {"a": 1}),
        ("geo", "here"), ("geo", [1]), ("geo", [1, 2, 3]), ("geo", [True, False]), ("geo", {"lat": 1, "lon": 2}),
        ("geo", ["1", "2"]), ("geo", [None, 1]),
    ]
    invalid_value: list[tuple[str, Any]] = [
        ("title", "t" * 1001), ("company", "é" * 1001), ("skills", ["s"] * 501), ("skills", ["x" * 1001]),
        ("geo", [90.5, 0]), ("geo", [0, -180.01]), ("geo", [10**400, 0]), ("geo", [0, -(10**30)]),
        ("geo", [-1e308, 0]), ("company", "\ud800"), ("title", "a\udfffb"), ("skills", ["go", "\udbff"]),
    ]
    roll = m.rng.random()
    if roll < 0.15:
        obj["profile"] = m.rng.choice([[], "x", 7, [profile]])
        return _dumps(obj), "wrong_type"
    if roll < 0.55:
        field, value = m.rng.choice(wrong_type)
        code = "wrong_type"
    else:
        field, value = m.rng.choice(invalid_value)
        code = "invalid_value"
    profile[field] = value
    obj["profile"] = profile
    return json.dumps(obj).encode(), code  # ensure_ascii: surrogates as escapes, as a JSON producer writes them


# name → (case, the kinds it applies to)
BAD_CASES: dict[str, tuple[BadCase, tuple[str, ...]]] = {
    "random_bytes": (_random_bytes, INPUT_KINDS),
    "random_text": (_random_text, INPUT_KINDS),
    "truncated_json": (_truncated, INPUT_KINDS),
    "trailing_garbage": (_trailing_garbage, INPUT_KINDS),
    "byte_order_mark": (_byte_order_mark, INPUT_KINDS),
    "empty_or_tombstone": (_empty, INPUT_KINDS),
    "not_an_object": (_not_an_object, INPUT_KINDS),
    "missing_field": (_missing_field, INPUT_KINDS),
    "null_everywhere": (_null_everywhere, INPUT_KINDS),
    "id_wrong_type": (_id_wrong_type, INPUT_KINDS),
    "id_out_of_range": (_id_out_of_range, INPUT_KINDS),
    "unparseable_number": (_unparseable_number, INPUT_KINDS),
    "invalid_utf8_in_text": (_invalid_utf8_in_text, INPUT_KINDS),
    "oversize": (_oversize, INPUT_KINDS),
    "duplicate_keys": (_duplicate_keys, INPUT_KINDS),
    "deep_nesting": (_deep_nesting, INPUT_KINDS),
    "bad_timestamp": (_bad_timestamp, INPUT_KINDS),
    "self_reference": (_self_reference, SELF_REFERENCE_INVALID),
    "bad_action": (_bad_action, ("connections",)),
    "bad_profile": (_bad_profile, ("users",)),
}


# ---- valid however odd: (maker, kind) → (key, value, event) --------------------------------------------------------
def _odd_but_valid(m: _Maker, kind: str) -> tuple[str, bytes | None, bytes, InputEvent]:
    """One hostile-looking but valid message of this kind: (case, key, value, the event it stands for)."""
    obj = m.base(kind)
    event = event_of(kind, obj)
    case = m.rng.choice(["foreign_key", "no_key", "garbage_key", "whitespace", "extra_fields", "escaped_names",
                         "id_limits", "negative_zero", "exactly_max_bytes", "near_future"]
                        + (["nulls_mean_absent"] * 3 if kind == "users" else []))
    key: bytes | None = user_key(event.key)
    value = _dumps(obj)
    if case == "foreign_key":  # keyed by another user: the worker must forward it to the owner
        key = user_key(m.user())
    elif case == "no_key":
        key = None
    elif case == "garbage_key":
        key = m.rng.randbytes(m.rng.randint(1, 40))
    elif case == "whitespace":
        value = b" \n\t" + json.dumps(obj, indent=m.rng.choice([None, 2])).encode() + b"\r\n "
    elif case == "extra_fields":
        extra = m.rng.choice(['"\\ud800 lone surrogate, never stored"', "[" * 20 + "]" * 20,
                              '{"src": "x", "nested": {"ts": -1}}', '"' + "z" * 5000 + '"', "12345678901234567890123"])
        value = _with_literal(obj, "extra", extra)
    elif case == "escaped_names":  # \u escapes in names and text decode to the plain field names
        text = _dumps(obj).decode()
        for name in (*ID_FIELDS[kind], "ts"):
            escaped = "".join(f"\\u{ord(c):04x}" if i % 2 == 0 else c for i, c in enumerate(name))
            text = text.replace(f'"{name}":', f'"{escaped}":', 1)
        value = text.encode()
    elif case == "nulls_mean_absent":
        profile = {name: None for name in Profile.FIELDS}
        chosen = m.rng.choice([None, profile, {**profile, "title": "cto"}])
        obj["profile"] = chosen
        event = event_of(kind, {**obj, "profile": {k: v for k, v in (chosen or {}).items() if v is not None}})
        value = _dumps(obj)
    elif case == "id_limits":
        first = ID_FIELDS[kind][0]
        obj[first] = m.rng.choice([0, MAX_USER_ID])
        if len(ID_FIELDS[kind]) == 2 and obj[first] == obj[ID_FIELDS[kind][1]]:
            obj[ID_FIELDS[kind][1]] = 1 if obj[first] == 0 else 0
        obj["ts"] = m.rng.choice([0, obj["ts"]])
        event = event_of(kind, obj)
        key = user_key(event.key)
        value = _dumps(obj)
    elif case == "negative_zero":  # -0 is the JSON integer 0
        first = ID_FIELDS[kind][0]
        obj[first] = 0
        if len(ID_FIELDS[kind]) == 2 and obj[ID_FIELDS[kind][1]] == 0:
            obj[ID_FIELDS[kind][1]] = 1
        event = event_of(kind, obj)
        key = user_key(0)
        value = _dumps(obj).replace(f'"{first}":0'.encode(), f'"{first}":-0'.encode(), 1)
    elif case == "exactly_max_bytes":
        head = _dumps({**obj, "pad": ""})[:-2]
        value = head + b"p" * (m.max_bytes - len(head) - 2) + b'"}'
    elif case == "near_future":  # within the allowed clock skew (the worker's clock is read minutes later)
        obj["ts"] = m.now_ms + DAY_MS - 3600 * 1000
        event = event_of(kind, obj)
        value = _dumps(obj)
    return case, key, value, event


def hostile_corpus(seed: int, users: Sequence[int], now_ms: int, n_bad: int = 1000, n_odd_valid: int = 100,
                   max_bytes: int = 64 * 1024) -> list[HostileMessage]:
    """``n_bad`` malformed messages (every case of :data:`BAD_CASES` about equally often, spread over the kinds
    it applies to) and ``n_odd_valid`` valid ones that look hostile, shuffled. ``users`` are the ids valid events
    use (at least two); ``now_ms`` is about when a worker will read them (timestamps are set around it)."""
    rng = random.Random(seed)
    maker = _Maker(rng, users, now_ms, max_bytes)
    out: list[HostileMessage] = []
    names = sorted(BAD_CASES)
    for index in range(n_bad):
        name = names[index % len(names)]
        case, kinds = BAD_CASES[name]
        kind = kinds[(index // len(names)) % len(kinds)]
        value, expected = case(maker, kind)
        key = maker.key()
        if value is None and key is None:  # Kafka has no message without key and value
            key = user_key(maker.user())
        out.append(HostileMessage(kind, key, value, expected, name))
    for index in range(n_odd_valid):
        kind = INPUT_KINDS[index % len(INPUT_KINDS)]
        name, key, value, event = _odd_but_valid(maker, kind)
        out.append(HostileMessage(kind, key, value, None, name, event))
    rng.shuffle(out)
    return out
