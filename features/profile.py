"""Profile features: pure similarity functions over :class:`~pymk.events.Profile`, and the profile state of
the local users of one partition.

Similarity (all pure, all symmetric, all tolerant of missing profiles and fields):

* ``same_company_current``, ``same_school``, ``same_industry``: 1 when both fields are given and equal after
  :func:`normalise_text` (so "ACME  Corp" and "acme corp" match), else 0. A missing field never matches.
* ``skill_jaccard_sim``: Jaccard of the normalised skill sets; 0 when either set is empty or missing.
* ``title_cosine_sim``: cosine of the title token-count vectors (:func:`title_tokens`); 0 when missing.
* ``geo_distance_km``: haversine great-circle distance; ``None`` when either geo is missing (a distance of 0
  would claim the two users are neighbours).

State (:class:`ProfileStore`): a users event (sign-up or update) gives only some fields; ``None`` means
"not given", so an update never clears a field. Each field is a last-writer-wins register ordered by
``(ts, canonical JSON of the value)``: a late older update cannot overwrite a newer field, and two updates
with the same ts resolve the same way whatever their arrival order. The sign-up time is the minimum ts of
every users event of the user. Every merge is commutative, associative and idempotent, so duplicates and
replays after a crash change nothing.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from pymk.events import Profile, UserEvent
from pymk.features.keyspace import PROFILE  # the rows: features/keyspace.py
from pymk.features.storage import RowStore, evict_oldest_rows, row_cache_bytes, row_key, row_user

EARTH_RADIUS_KM = 6371.0088  # mean earth radius (IUGG)

# Words that say nothing about the job: "head of sales" and "vp of engineering" should not look alike.
TITLE_STOPWORDS: frozenset[str] = frozenset({"a", "an", "and", "at", "for", "in", "of", "on", "the", "to", "&"})

_TOKEN = re.compile(r"\w+", re.UNICODE)


# ---- text ----------------------------------------------------------------------------------------------------
def normalise_text(s: str | None) -> str:
    """NFKC, casefold, strip, and collapse runs of whitespace to one space ("" for None)."""
    if not s:
        return ""
    # NFKC first so that composed and decomposed accents (and full-width letters) compare equal.
    return " ".join(unicodedata.normalize("NFKC", s).casefold().split())


def tokenise(s: str | None) -> list[str]:
    """Word tokens of the normalised text (letters, digits and underscores; punctuation splits)."""
    return _TOKEN.findall(normalise_text(s))


def title_tokens(title: str | None) -> list[str]:
    """Tokens of a job title without :data:`TITLE_STOPWORDS`."""
    return [t for t in tokenise(title) if t not in TITLE_STOPWORDS]


def skill_set(skills: tuple[str, ...] | None) -> frozenset[str]:
    """Normalised, non-empty skills."""
    if not skills:
        return frozenset()
    return frozenset(n for n in (normalise_text(s) for s in skills) if n)


# ---- similarity -------------------------------------------------------------------------------------------------
def _same_text(a: str | None, b: str | None) -> int:
    na, nb = normalise_text(a), normalise_text(b)
    return int(bool(na) and na == nb)


def same_company_current(a: Profile | None, b: Profile | None) -> int:
    """1 when both users' current companies are given and equal (normalised), else 0."""
    if a is None or b is None:
        return 0
    return _same_text(a.company, b.company)


def same_school(a: Profile | None, b: Profile | None) -> int:
    if a is None or b is None:
        return 0
    return _same_text(a.school, b.school)


def same_industry(a: Profile | None, b: Profile | None) -> int:
    if a is None or b is None:
        return 0
    return _same_text(a.industry, b.industry)


def skill_jaccard_sim(a: Profile | None, b: Profile | None) -> float:
    """|A ∩ B| / |A ∪ B| of the normalised skill sets; 0 when either is empty or missing."""
    if a is None or b is None:
        return 0.0
    sa, sb = skill_set(a.skills), skill_set(b.skills)
    if not sa or not sb:
        return 0.0
    return len(sa & sb) / len(sa | sb)


def title_cosine_sim(a: Profile | None, b: Profile | None) -> float:
    """Cosine of the title token-count vectors; 0 when either title is missing or has no tokens."""
    if a is None or b is None:
        return 0.0
    ca, cb = Counter(title_tokens(a.title)), Counter(title_tokens(b.title))
    if not ca or not cb:
        return 0.0
    dot = sum(n * cb[t] for t, n in ca.items() if t in cb)
    norm = math.sqrt(sum(n * n for n in ca.values())) * math.sqrt(sum(n * n for n in cb.values()))
    return min(1.0, dot / norm)  # min: rounding must not push identical titles above 1


def haversine_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    phi1, phi2 = math.radians(lat1), math.radians(lat2)
    dphi, dlmb = phi2 - phi1, math.radians(lon2 - lon1)
    h = math.sin(dphi / 2) ** 2 + math.cos(phi1) * math.cos(phi2) * math.sin(dlmb / 2) ** 2
    # min: rounding can push h just above 1 for antipodal points, and asin would fail.
    return 2 * EARTH_RADIUS_KM * math.asin(math.sqrt(min(1.0, h)))


def geo_distance_km(a: Profile | None, b: Profile | None) -> float | None:
    """Great-circle distance between the two users' geos; None when either is missing."""
    if a is None or b is None or a.geo is None or b.geo is None:
        return None
    return haversine_km(a.geo[0], a.geo[1], b.geo[0], b.geo[1])


# Feature name → the profile field it reads (for the timestamps of the inputs of a feature).
PROFILE_FEATURE_FIELDS: dict[str, str] = {
    "same_company_current": "company",
    "same_school": "school",
    "same_industry": "industry",
    "skill_jaccard_sim": "skills",
    "title_cosine_sim": "title",
    "geo_distance_km": "geo",
}


def profile_features(a: Profile | None, b: Profile | None) -> dict[str, float | int | None]:
    """Every profile similarity feature of a pair, by name (the keys of :data:`PROFILE_FEATURE_FIELDS`)."""
    return {
        "same_company_current": same_company_current(a, b),
        "same_school": same_school(a, b),
        "same_industry": same_industry(a, b),
        "skill_jaccard_sim": skill_jaccard_sim(a, b),
        "title_cosine_sim": title_cosine_sim(a, b),
        "geo_distance_km": geo_distance_km(a, b),
    }


def profile_feature_timestamps(ts_a: dict[str, int], ts_b: dict[str, int]) -> dict[str, int | None]:
    """For each profile feature, the ts of the latest event that changed one of its inputs (None: neither
    user has the field), from the two users' :meth:`ProfileStore.field_timestamps`."""
    out: dict[str, int | None] = {}
    for feature, name in PROFILE_FEATURE_FIELDS.items():
        stamps = [ts[name] for ts in (ts_a, ts_b) if name in ts]
        out[feature] = max(stamps) if stamps else None
    return out


def merge_profile(old: Profile | None, update: Profile) -> Profile:
    """``old`` with every field that ``update`` gives (non-None) replaced; the others are kept."""
    if old is None:
        return update
    given = {name: getattr(update, name) for name in Profile.FIELDS if getattr(update, name) is not None}
    return replace(old, **given) if given else old


# ---- state ----------------------------------------------------------------------------------------------------
def _json_value(name: str, value: Any) -> Any:
    """The JSON form of a field value (tuples become lists; geo always floats, so (1, 2) and (1.0, 2.0) are
    the same value to the register order)."""
    if name == "geo":
        return [float(value[0]), float(value[1])]
    return list(value) if isinstance(value, tuple) else value


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _field_value(name: str, value: Any) -> Any:
    """A stored JSON value back to the type :class:`Profile` uses."""
    if name == "skills":
        return tuple(str(s) for s in value)
    if name == "geo":
        return (float(value[0]), float(value[1]))
    return value


@dataclass
class _ProfileRow:
    signed_up_at: int
    fields: dict[str, tuple[int, Any]] = field(default_factory=dict)  # name → (ts, JSON value)

    def encode(self) -> bytes:
        data = {"s": self.signed_up_at, "f": {name: [ts, value] for name, (ts, value) in self.fields.items()}}
        return _canonical(data).encode()

    @classmethod
    def decode(cls, raw: bytes) -> _ProfileRow:
        data = json.loads(raw)
        return cls(int(data["s"]), {name: (int(ts), value) for name, (ts, value) in data["f"].items()})

    def profile(self) -> Profile:
        return Profile(**{name: _field_value(name, value) for name, (_, value) in self.fields.items()})


@dataclass
class ProfileStats:
    events: int = 0  # users events applied
    field_changes: int = 0  # field registers that changed
    stale_fields: int = 0  # given fields that lost to a newer (or equal, greater) value


class ProfileStore:
    """Latest profile of each local user over a :class:`RowStore` (see the module doc): a write-back cache
    with a dirty set, persisted by :meth:`dirty_rows` / :meth:`mark_clean` or :meth:`flush`."""

    def __init__(self, store: RowStore, max_cached_rows: int = 1_000_000) -> None:
        self.store = store
        self.max_cached_rows = max_cached_rows
        self.stats = ProfileStats()
        self._rows: dict[int, _ProfileRow | None] = {}  # None: known to have no row (saves a store read)
        self._built: dict[int, Profile] = {}  # user → Profile of its row (ranking reads thousands per list)
        self._dirty: set[int] = set()
        self._changed: set[int] = set()  # users changed since the refresher's last take (see graph.py)

    def _row(self, user: int) -> _ProfileRow | None:
        if user in self._rows:
            return self._rows[user]
        raw = self.store.get(row_key(PROFILE, user))
        row = _ProfileRow.decode(raw) if raw is not None else None
        self._rows[user] = row
        return row

    def has_user(self, user: int) -> bool:
        """Whether some event gave ``user`` a profile row. Reads without caching (see PartitionGraph.has_user)."""
        if user in self._rows:
            return self._rows[user] is not None
        return self.store.get(row_key(PROFILE, user)) is not None

    # ---- applying events ----------------------------------------------------------------------------------
    def apply(self, event: UserEvent) -> bool:
        """Merge a users event into the user's profile; True when anything (a field, the sign-up ts) changed."""
        self.stats.events += 1
        row = self._row(event.user)
        changed = False
        if row is None:
            row = _ProfileRow(event.ts)
            self._rows[event.user] = row
            changed = True
        elif event.ts < row.signed_up_at:
            row.signed_up_at = event.ts  # the minimum: a late sign-up event moves it back
            changed = True
        for name in Profile.FIELDS:
            value = getattr(event.profile, name)
            if value is None:
                continue  # not given: the update leaves this field alone
            new = (event.ts, _json_value(name, value))
            old = row.fields.get(name)
            # Register order: ts, then the canonical JSON, so equal-ts updates converge whatever the order.
            if old is None or (new[0], _canonical(new[1])) > (old[0], _canonical(old[1])):
                row.fields[name] = new
                self.stats.field_changes += 1
                changed = True
            else:
                self.stats.stale_fields += int(new[0] != old[0] or _canonical(new[1]) != _canonical(old[1]))
        if changed:
            self._dirty.add(event.user)
            self._changed.add(event.user)
            self._built.pop(event.user, None)
        return changed

    # ---- reads -------------------------------------------------------------------------------------------------
    def profile(self, user: int) -> Profile | None:
        """The user's current profile (fields never given are None); None when no users event was seen."""
        built = self._built.get(user)
        if built is not None:
            return built
        row = self._row(user)
        if row is None:
            return None
        built = self._built[user] = row.profile()
        return built

    def field_timestamps(self, user: int) -> dict[str, int]:
        """Field → ts of the users event whose value the field holds (only fields that were given)."""
        row = self._row(user)
        return {} if row is None else {name: ts for name, (ts, _) in row.fields.items()}

    def signed_up_at(self, user: int) -> int | None:
        """The ts of the user's first users event (the minimum seen), None when none was seen."""
        row = self._row(user)
        return None if row is None else row.signed_up_at

    def last_changed(self, user: int) -> int | None:
        """The ts of the latest event that changed the profile (None when no users event was seen)."""
        row = self._row(user)
        if row is None:
            return None
        return max((ts for ts, _ in row.fields.values()), default=row.signed_up_at)

    def local_users(self) -> Iterator[int]:
        """Every user with a profile row (from the store and the cache)."""
        seen = {u for u, row in self._rows.items() if row is not None}
        yield from seen
        for key, _ in self.store.scan(PROFILE):
            user = row_user(key)
            if user not in seen:
                yield user

    # ---- commit ----------------------------------------------------------------------------------------------
    def dirty_rows(self) -> tuple[dict[bytes, bytes], list[bytes]]:
        """The puts (and deletes: none, profiles are never removed) since the last :meth:`mark_clean`."""
        puts: dict[bytes, bytes] = {}
        for user in self._dirty:
            row = self._rows[user]
            if row is not None:
                puts[row_key(PROFILE, user)] = row.encode()
        return puts, []

    def take_changed_users(self) -> set[int]:
        """Local users whose profile changed (or who signed up) since the last take."""
        changed, self._changed = self._changed, set()
        return changed

    def mark_clean(self) -> None:
        """The dirty rows are durable; forget them, and drop the cache when it has grown past its bound."""
        self._dirty.clear()
        if len(self._rows) > self.max_cached_rows:
            self.drop_cache()

    def cached_rows(self) -> int:
        """How many rows are cached (cheap enough for every flush)."""
        return len(self._rows) + len(self._built)

    def cached_bytes(self) -> int:
        """Approximate memory of the cached rows: a field (with its ts) and a built profile's field counted as
        two entries each (:func:`pymk.features.storage.row_cache_bytes`)."""
        fields = sum(len(row.fields) for row in self._rows.values() if row is not None)
        return row_cache_bytes(len(self._rows) + len(self._built), 2 * fields + 2 * 6 * len(self._built))

    def drop_cache(self) -> None:
        """Forget every cached row (only when none is dirty: they are all in the store)."""
        self.evict_oldest(1.0)

    def evict_oldest(self, fraction: float) -> None:
        """Forget the oldest-loaded ``fraction`` of the cache (only when no row is dirty)."""
        assert not self._dirty, "evicting dirty rows would lose them"
        evict_oldest_rows(self._rows, fraction)
        evict_oldest_rows(self._built, fraction)

    def flush(self) -> int:
        """Write every dirty row in one atomic batch (for callers with nothing else to commit)."""
        puts, deletes = self.dirty_rows()
        self.store.write(puts, deletes)
        self.mark_clean()
        return len(puts) + len(deletes)
