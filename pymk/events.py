"""Typed records for the events of the contract (docs/contract.md), with their JSON encodings.

Input events: connections, profile views, dismissals, engagements, users (sign-up or profile update).
Output events: recommendations, impressions, dead letters. Records are frozen; ``to_json`` gives the
wire form and each input record's ``key`` is the user id the contract keys its topic by.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import orjson

MAX_USER_ID = 2**63 - 1


def _dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON. orjson, not json: a published list logs 20 impressions and a 60-row unshown sample,
    ~1,800 floats, which json.dumps took 1.1 ms to write (a fifth of ranking the list), orjson 0.08 ms. The
    numbers read back the same; NaN and infinities, which no record should carry, are written as null."""
    return orjson.dumps(obj)


def user_key(user: int) -> bytes:
    """The Kafka key of every user-keyed topic: the decimal user id (so any client can produce it)."""
    return str(user).encode()


class _FlatEvent:
    """An input event of plain fields: its JSON is its fields in declaration order (orjson writes a dataclass
    that way), its key the field the contract keys its topic by."""

    KIND: ClassVar[str]
    KEY_FIELD: ClassVar[str]

    @property
    def key(self) -> int:
        return int(getattr(self, self.KEY_FIELD))

    def to_json(self) -> bytes:
        return _dumps(self)


@dataclass(frozen=True)
class ConnectionEvent(_FlatEvent):
    KIND: ClassVar[str] = "connections"
    KEY_FIELD: ClassVar[str] = "src"
    src: int
    dst: int
    action: str  # "add" | "remove"
    ts: int


@dataclass(frozen=True)
class ProfileViewEvent(_FlatEvent):
    KIND: ClassVar[str] = "profile-views"
    KEY_FIELD: ClassVar[str] = "viewer"
    viewer: int
    viewed: int
    ts: int


@dataclass(frozen=True)
class DismissalEvent(_FlatEvent):
    KIND: ClassVar[str] = "dismissals"
    KEY_FIELD: ClassVar[str] = "user"
    user: int
    candidate: int
    ts: int


@dataclass(frozen=True)
class EngagementEvent(_FlatEvent):
    KIND: ClassVar[str] = "engagements"
    KEY_FIELD: ClassVar[str] = "user"
    user: int
    item: int
    ts: int


@dataclass(frozen=True)
class Profile:
    """Every field is optional: ``None`` means "not given" (an update leaves such a field unchanged)."""

    company: str | None = None
    school: str | None = None
    industry: str | None = None
    title: str | None = None
    skills: tuple[str, ...] | None = None
    geo: tuple[float, float] | None = None

    FIELDS: ClassVar[tuple[str, ...]] = ("company", "school", "industry", "title", "skills", "geo")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in self.FIELDS:
            value = getattr(self, name)
            if value is not None:
                out[name] = list(value) if isinstance(value, tuple) else value
        return out


@dataclass(frozen=True)
class UserEvent:
    KIND: ClassVar[str] = "users"
    user: int
    ts: int
    profile: Profile = field(default_factory=Profile)

    @property
    def key(self) -> int:
        return self.user

    def to_json(self) -> bytes:
        return _dumps({"user": self.user, "ts": self.ts, "profile": self.profile.to_dict()})


InputEvent = ConnectionEvent | ProfileViewEvent | DismissalEvent | EngagementEvent | UserEvent
INPUT_EVENT_TYPES: dict[str, type] = {
    cls.KIND: cls for cls in (ConnectionEvent, ProfileViewEvent, DismissalEvent, EngagementEvent, UserEvent)
}


@dataclass(frozen=True)
class RecommendationItem:
    candidate: int
    score: float
    rank: int
    sources: tuple[str, ...]
    reasons: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"candidate": self.candidate, "score": self.score, "rank": self.rank,
                "sources": list(self.sources), "reasons": self.reasons}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RecommendationItem:
        return cls(candidate=int(data["candidate"]), score=float(data["score"]), rank=int(data["rank"]),
                   sources=tuple(data.get("sources", ())), reasons=dict(data.get("reasons", {})))


@dataclass(frozen=True)
class Recommendations:
    KIND: ClassVar[str] = "recommendations"
    user: int
    generated_at: int
    model_version: str
    items: tuple[RecommendationItem, ...]

    @property
    def key(self) -> int:
        return self.user

    def to_dict(self) -> dict[str, Any]:
        return {"user": self.user, "generated_at": self.generated_at, "model_version": self.model_version,
                "items": [item.to_dict() for item in self.items]}

    def to_json(self) -> bytes:
        return _dumps(self.to_dict())

    @classmethod
    def from_json(cls, raw: bytes | str) -> Recommendations:
        data = json.loads(raw)
        return cls(user=int(data["user"]), generated_at=int(data["generated_at"]),
                   model_version=str(data["model_version"]),
                   items=tuple(RecommendationItem.from_dict(item) for item in data.get("items", [])))


# (candidate, rank, score, features, sources, weight) of one impression of a list (Impression.of_list)
ImpressionRow = tuple[int, int, float, dict[str, float | None], tuple[str, ...], float]


@dataclass(frozen=True)
class Impression:
    """One item of a published list, with the exact feature vector the model scored (for training on the
    model's own traffic). ``ts``: when it was published (wall clock); ``as_of``: the event time it was ranked
    at, which the delayed labels are measured from. ``rank`` 0: a candidate scored but not shown, logged as a
    sample of the rest of the pool (an extension of the contract's record; a list's sample is one record of the
    ``impressions-unshown`` topic, :func:`unshown_sample_to_json`); ``weight``: how many candidates of
    the pool that sampled row stands for (1 for a shown item), so training can weigh the sample back to the pool."""

    KIND: ClassVar[str] = "impressions"
    user: int
    candidate: int
    rank: int
    score: float
    model_version: str
    features: dict[str, float | None]
    ts: int
    as_of: int = 0
    sources: tuple[str, ...] = ()
    weight: float = 1.0

    @property
    def key(self) -> int:
        return self.user

    def to_json(self) -> bytes:
        # The fields in order, as asdict() gives them, without its deep copy (20 of these per published list).
        return _dumps({"user": self.user, "candidate": self.candidate, "rank": self.rank, "score": self.score,
                       "model_version": self.model_version, "features": self.features, "ts": self.ts,
                       "as_of": self.as_of, "sources": list(self.sources), "weight": self.weight})

    @classmethod
    def of_list(cls, user: int, model_version: str, ts: int, as_of: int,
                rows: Iterable[ImpressionRow]) -> list[Impression]:
        """The impressions of one list from (candidate, rank, score, features, sources, weight) rows: each equal to
        ``Impression(user=user, candidate=…, …)``, field for field, without the frozen dataclass's
        ``object.__setattr__`` per field (~2.5 µs an impression, and a list logs ~80)."""
        new = object.__new__
        out: list[Impression] = []
        for candidate, rank, score, features, sources, weight in rows:
            impression = new(cls)
            impression.__dict__.update(user=user, candidate=candidate, rank=rank, score=score,
                                       model_version=model_version, features=features, ts=ts, as_of=as_of,
                                       sources=sources, weight=weight)
            out.append(impression)
        return out

    @classmethod
    def from_json(cls, raw: bytes | str) -> Impression:
        data = json.loads(raw)
        return cls(user=int(data["user"]), candidate=int(data["candidate"]), rank=int(data["rank"]),
                   score=float(data["score"]), model_version=str(data["model_version"]),
                   features=dict(data["features"]), ts=int(data["ts"]), as_of=int(data.get("as_of", 0)),
                   sources=tuple(data.get("sources", ())), weight=float(data.get("weight", 1.0)))


UNSHOWN_KIND = "impressions-unshown"


def unshown_sample_to_json(sample: Sequence[Impression]) -> bytes:
    """One list's unshown sample (``rank`` 0 impressions of one user, one ranking) as one record of the
    ``impressions-unshown`` topic: a record per row cost ~80 µs to produce, as much as ranking the list."""
    first = sample[0]
    return _dumps({"user": first.user, "model_version": first.model_version, "ts": first.ts, "as_of": first.as_of,
                   "items": [{"candidate": i.candidate, "score": i.score, "weight": i.weight,
                              "features": i.features, "sources": list(i.sources)} for i in sample]})


def unshown_sample_from_json(raw: bytes | str) -> list[Impression]:
    data = json.loads(raw)
    user, version, ts, as_of = int(data["user"]), str(data["model_version"]), int(data["ts"]), int(data["as_of"])
    return [Impression(user=user, candidate=int(item["candidate"]), rank=0, score=float(item["score"]),
                       model_version=version, features=dict(item["features"]), ts=ts, as_of=as_of,
                       sources=tuple(item.get("sources", ())), weight=float(item.get("weight", 1.0)))
            for item in data["items"]]


# A dead letter must always be sendable, whatever the message it reports: its key and the copy of the value are
# bounded so that the whole record (Kafka key + JSON value, escaping included) stays far below the producer's and
# the topic's 4 MiB limit. A message that could not be dead-lettered would stop the worker at every restart.
DEAD_LETTER_KEY_BYTES = 1024
DEAD_LETTER_RECORD_BYTES = 1024 * 1024


def _bytes_as_text(data: bytes, cut: bool) -> tuple[str, str]:
    """(text, encoding): UTF-8 text when ``data`` is valid UTF-8 (a ``cut`` prefix may end inside a character,
    which is dropped), else base64."""
    for drop in range(4 if cut else 1):
        try:
            return data[: len(data) - drop].decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            continue
    return base64.b64encode(data).decode(), "base64"


@dataclass(frozen=True)
class DeadLetter:
    """An input message that could not be applied, or a user whose work failed (``internal_error``).

    ``raw`` is the message value as received: text when it is valid UTF-8 (``raw_encoding="utf-8"``), else base64
    (``raw_encoding="base64"``). Values larger than the size limit are cut to it (``truncated``; ``size`` is always
    the original length in bytes). The key likewise: ``key`` (text or base64 by ``key_encoding``) is cut to
    :data:`DEAD_LETTER_KEY_BYTES` (``key_truncated``; ``key_size`` the original length), and the record's own Kafka
    key is the same cut bytes. ``user``: the user an ``internal_error`` of ranking or embedding is about."""

    KIND: ClassVar[str] = "dead-letter"
    topic: str
    partition: int
    offset: int
    reason: str
    raw: str
    raw_encoding: str = "utf-8"
    size: int = 0
    truncated: bool = False
    key: str | None = None
    key_encoding: str = "utf-8"
    key_size: int = 0
    key_truncated: bool = False
    user: int | None = None

    @classmethod
    def for_message(cls, topic: str, partition: int, offset: int, reason: str, raw: bytes | None,
                    key: bytes | None = None, limit: int = 64 * 1024, user: int | None = None) -> DeadLetter:
        raw = raw or b""
        key_text, key_encoding = (None, "utf-8") if key is None else _bytes_as_text(
            key[:DEAD_LETTER_KEY_BYTES], len(key) > DEAD_LETTER_KEY_BYTES)
        kept = raw[: max(0, limit)]
        while True:
            text, encoding = _bytes_as_text(kept, len(kept) < len(raw))
            letter = cls(topic=topic, partition=partition, offset=offset, reason=reason[:4096], raw=text,
                         raw_encoding=encoding, size=len(raw), truncated=len(kept) < len(raw), key=key_text,
                         key_encoding=key_encoding, key_size=0 if key is None else len(key),
                         key_truncated=key is not None and len(key) > DEAD_LETTER_KEY_BYTES, user=user)
            # JSON escaping can make a text up to 6 times its bytes (control characters): halve until it fits
            if not kept or len(letter.to_json()) <= DEAD_LETTER_RECORD_BYTES - DEAD_LETTER_KEY_BYTES:
                return letter
            kept = kept[: len(kept) // 2]

    @property
    def record_key(self) -> bytes | None:
        """The dead-letter record's Kafka key: the message's key as received, cut like ``key``."""
        if self.key is None:
            return None
        return base64.b64decode(self.key) if self.key_encoding == "base64" else self.key.encode("utf-8")

    def raw_bytes(self) -> bytes:
        return base64.b64decode(self.raw) if self.raw_encoding == "base64" else self.raw.encode("utf-8")

    def to_json(self) -> bytes:
        return _dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str) -> DeadLetter:
        data = json.loads(raw)
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
