"""Stage 2 input: the feature matrix (the 17 seed features, then activity, RA and structure) of (query user,
candidate) pairs, built with numpy for up to 2,000 candidates at a time (the hot path of every recommendation).

Columns, in :data:`FEATURE_NAMES` order:

* graph: ``common_neighbor_count`` and ``adamic_adar_score`` from Stage 1 (exact, from
  :meth:`RankingSource.two_hop`); ``jaccard_sim`` = CN / (deg u + deg v − CN) (0 when the union is empty);
  ``graph_distance_bucket`` 2 when CN > 0 else 3 (a candidate is never a connection); ``query_degree_log``
  and ``candidate_degree_log`` = log1p(degree). The same definitions as :mod:`pymk.features.pair`.
* behavioural: ``query_viewed_candidate_profile`` (distinct views user → candidate),
  ``profile_view_recency_days`` ((as_of − latest view either way) / 1 day, at least 0; NaN without views),
  ``mutual_profile_views`` (min of the two directions' counts), ``co_engaged_with_content`` (shared items).
* profile: the six functions of :mod:`pymk.features.profile`, vectorised. Text goes through the same
  :func:`normalise_text` / :func:`skill_set` / :func:`title_tokens`, and the arithmetic is done in the same
  order (Jaccard = |∩| / |∪|, cosine = dot / (√Σa² · √Σb²), haversine step by step), so values are the
  worker's: the categorical ones, Jaccard and cosine bit for bit, the distance to the last ulp or so (numpy's
  sin/cos may differ from libm's in the last bit). Missing geo is NaN.
* ``gnn_embedding_cosine_sim``: cosine of the two embeddings (NaN when either is missing).
* activity (:class:`~pymk.ranking.source.ActivitySource`): the candidate's decayed count of connection adds
  with time constants of 1, 7 and 30 days, days since its latest connection change, and the query user's
  7-day activity and days since its latest change, all as of ``as_of_ms``. Who connects next is, on
  message-like graphs, who is connecting now: all-time degree (popularity) misses that. NaN when the source
  does not implement :class:`ActivitySource` (or for "days since" when the user never connected), so a
  source without it still ranks (XGBoost routes missing values).
* ``resource_allocation_score``: Σ 1/deg z over the common neighbours
  (:class:`~pymk.ranking.source.ResourceAllocationSource`; NaN for a source without it), the best single
  heuristic on the random-split reference graphs.
* structure of the common neighbours beyond their count (:class:`~pymk.ranking.source.EgoAdjacencySource`,
  :func:`structure_columns`; NaN for a source without it): how many common neighbours fall in each degree band
  (1–4, 5–16, 17–64, over 64), their smallest and largest degree, the 3-paths through two of the user's friends,
  each common neighbour's share of friends inside the user's circle, and CN / deg of either side. RA and AA
  weigh common neighbours by one fixed function of their degree; the bands and the circle let the trees learn
  the weighting each graph needs (the idea behind neural common-neighbour models), from rows the worker holds.

Parsing a profile (normalising, tokenising) costs far more than comparing two, and the worker ranks the same
candidates again and again, so :class:`ProfileCache` keeps every user's parsed profile in flat arrays (a
slot per user) and re-parses only when the source returns a different profile.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from itertools import repeat
from typing import Any, TypeVar

import numpy as np

from pymk.events import Profile
from pymk.features.profile import EARTH_RADIUS_KM, normalise_text, skill_set, title_tokens
from pymk.ranking.candidates import CandidateSet
from pymk.ranking.id_index import IdIndex
from pymk.ranking.source import (
    ACTIVITY_TIME_CONSTANTS_MS,
    ActivitySource,
    ActivityTable,
    ActivityTableSource,
    BatchReadSource,
    EgoAdjacency,
    EgoAdjacencySource,
    IdArraySource,
    ProfileIdentitySource,
    RankingSource,
    ResourceAllocationSource,
    TwoHopArraySource,
)

FEATURE_NAMES: tuple[str, ...] = (
    # graph
    "common_neighbor_count",
    "adamic_adar_score",
    "jaccard_sim",
    "graph_distance_bucket",
    "query_degree_log",
    "candidate_degree_log",
    # behavioural
    "query_viewed_candidate_profile",
    "profile_view_recency_days",
    "mutual_profile_views",
    "co_engaged_with_content",
    # profile
    "same_company_current",
    "same_school",
    "same_industry",
    "skill_jaccard_sim",
    "title_cosine_sim",
    "geo_distance_km",
    # embedding
    "gnn_embedding_cosine_sim",
    # activity (appended after the 17 seed features; see ActivitySource)
    "candidate_activity_1d",
    "candidate_activity_7d",
    "candidate_activity_30d",
    "candidate_days_since_last_connection",
    "query_activity_7d",
    "query_days_since_last_connection",
    # graph (ResourceAllocationSource)
    "resource_allocation_score",
    # the common neighbours' structure beyond their count (EgoAdjacencySource, structure_columns)
    "cn_degree_1_4",
    "cn_degree_5_16",
    "cn_degree_17_64",
    "cn_degree_over_64",
    "cn_min_degree",
    "cn_max_degree",
    "ego_three_path_count",
    "cn_ego_embeddedness",
    "cn_share_of_candidate",
    "cn_share_of_query",
)
STRUCTURE_FEATURES: tuple[str, ...] = FEATURE_NAMES[24:34]
_SHARE_OF_CANDIDATE, _SHARE_OF_QUERY = 32, 33
SEED_FEATURES = 17  # the first 17 columns are the seed spec's, in its order
# Which columns each part of :meth:`FeatureBuilder.matrix` writes (:meth:`FeatureBuilder.columns` recomputes by group)
COLUMN_GROUPS: dict[str, tuple[int, ...]] = {
    # with the two CN shares of the structure columns: CN / deg c moves with the candidate's degree, which the
    # incremental lists re-read at every update (with this group), not only when the user's 2-hop changed
    "graph": (0, 1, 2, 3, 4, 5, 32, 33),
    "behaviour": (6, 7, 8, 9),
    "profile": (10, 11, 12, 13, 14, 15),
    "embedding": (16,),
    "activity": (17, 18, 19, 20, 21, 22),
    # the structure columns ride with resource allocation: both are functions of the 2-hop rows alone, and the
    # incremental lists re-read this group whenever the graph changed
    "resource_allocation": (23, 24, 25, 26, 27, 28, 29, 30, 31),
}
# The columns whose value moves with the as-of time alone: the view recency and the activity columns
AS_OF_COLUMNS: tuple[int, ...] = (7, 17, 18, 19, 20, 21, 22)
ACTIVITY_FEATURES: tuple[str, ...] = FEATURE_NAMES[SEED_FEATURES : SEED_FEATURES + 6]
N_FEATURES = len(FEATURE_NAMES)
FEATURE_INDEX: dict[str, int] = {name: i for i, name in enumerate(FEATURE_NAMES)}
DAY_MS = 86_400_000
_DEG_TO_RAD = math.pi / 180.0  # the factor math.radians uses, so radians agree bit for bit
_V = TypeVar("_V")


class ProfileCache:
    """Parsed profiles in flat arrays, a slot per user (slot 0: "no profile"), so that comparing a user with
    1,000 candidates is a handful of numpy operations on gathered rows.

    Skills and title tokens are rows of padded tables (-1 = no entry) whose width grows with the longest
    list seen, up to :data:`MAX_PADDED`; a longer list (rare) lives in an overflow dict and is compared on its
    own. The cache is reset when it holds more than ``max_users`` users, so memory stays bounded.
    """

    MAX_PADDED = 64

    def __init__(self, max_users: int = 200_000) -> None:
        self.max_users = max_users
        self.parses = 0  # profiles parsed (a cache miss or a changed profile)
        self._reset()

    def _reset(self) -> None:
        capacity = 1024
        self._vocabulary: dict[str, int] = {}  # normalised text (company, school, skill, title token) → id
        self._slot_of = IdIndex()  # slots are given in order of first sight, as IdIndex numbers its rows
        self._profiles: list[Profile | None] = [None]
        self._object_id = np.full(capacity, id(None), np.uint64)  # id() of each slot's profile (see slots())
        self.company = np.full(capacity, -1, np.int64)
        self.school = np.full(capacity, -1, np.int64)
        self.industry = np.full(capacity, -1, np.int64)
        self.lat = np.full(capacity, np.nan)
        self.lon = np.full(capacity, np.nan)
        self.skill_count = np.zeros(capacity, np.int64)
        self.title_length = np.zeros(capacity, np.int64)  # distinct title tokens
        self.title_norm = np.zeros(capacity)  # √Σ count², 0 without tokens
        self.skill_table = np.full((capacity, 4), -1, np.int32)  # sorted skill ids, padded
        self.title_table = np.full((capacity, 4), -1, np.int32)  # sorted title token ids, padded
        self.title_count_table = np.zeros((capacity, 4), np.int32)  # their counts
        self.skill_overflow: dict[int, np.ndarray] = {}  # slot → ids, for lists longer than MAX_PADDED
        self.title_overflow: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        # Scratch for one query's marks by vocabulary id + 1 (index 0, the padding -1, stays 0): the candidates'
        # padded rows are then matched by one gather instead of np.isin's sort or a search (~0.4 ms a list).
        # Always all zero between calls of query_marks.
        self._marks = np.zeros(capacity, np.int64)

    def __len__(self) -> int:
        return len(self._slot_of)

    def _id(self, text: str) -> int:
        return self._vocabulary.setdefault(text, len(self._vocabulary))

    def _text_id(self, text: str | None) -> int:
        normal = normalise_text(text)
        return self._id(normal) if normal else -1

    def _grow_rows(self) -> None:
        size = len(self.company) * 2
        fills = {"company": -1, "school": -1, "industry": -1, "lat": np.nan, "lon": np.nan, "skill_count": 0,
                 "title_length": 0, "title_norm": 0, "skill_table": -1, "title_table": -1, "title_count_table": 0,
                 "_object_id": id(None)}
        for name, fill in fills.items():
            old = getattr(self, name)
            new = np.full((size, *old.shape[1:]), fill, old.dtype)
            new[: len(old)] = old
            setattr(self, name, new)

    def _widen(self, name: str, width: int, fill: int) -> None:
        old = getattr(self, name)
        if old.shape[1] < width:
            new = np.full((old.shape[0], min(self.MAX_PADDED, max(width, 2 * old.shape[1]))), fill, old.dtype)
            new[:, : old.shape[1]] = old
            setattr(self, name, new)

    def _parse(self, user: int, profile: Profile) -> int:
        self.parses += 1
        slot = self._slot_of.get(user)
        if slot is None:
            slot = self._slot_of.add(user)
            assert slot == len(self._profiles)
            self._profiles.append(profile)
            if slot >= len(self.company):
                self._grow_rows()
        self._profiles[slot] = profile
        self._object_id[slot] = id(profile)
        self.company[slot] = self._text_id(profile.company)
        self.school[slot] = self._text_id(profile.school)
        self.industry[slot] = self._text_id(profile.industry)
        geo = profile.geo
        self.lat[slot], self.lon[slot] = (float(geo[0]), float(geo[1])) if geo is not None else (np.nan, np.nan)

        skills = sorted(self._id(s) for s in skill_set(profile.skills))
        self.skill_count[slot] = len(skills)
        self.skill_table[slot] = -1
        self.skill_overflow.pop(slot, None)
        if len(skills) > self.MAX_PADDED:
            self.skill_overflow[slot] = np.array(skills, np.int64)
        elif skills:
            self._widen("skill_table", len(skills), -1)
            self.skill_table[slot, : len(skills)] = skills

        tokens = sorted((self._id(t), n) for t, n in Counter(title_tokens(profile.title)).items())
        self.title_length[slot] = len(tokens)
        # The same expression as title_cosine_sim's norm (exact integer sum, then sqrt).
        self.title_norm[slot] = math.sqrt(sum(n * n for _, n in tokens)) if tokens else 0.0
        self.title_table[slot] = -1
        self.title_count_table[slot] = 0
        self.title_overflow.pop(slot, None)
        ids, counts = [t for t, _ in tokens], [n for _, n in tokens]
        if len(tokens) > self.MAX_PADDED:
            self.title_overflow[slot] = (np.array(ids, np.int64), np.array(counts, np.int64))
        elif tokens:
            self._widen("title_table", len(tokens), -1)
            self._widen("title_count_table", len(tokens), 0)
            self.title_table[slot, : len(tokens)] = ids
            self.title_count_table[slot, : len(tokens)] = counts
        return slot

    def query_marks(self, ids: np.ndarray, values: np.ndarray | int) -> _QueryMarks:
        """A context in which ``marks[table + 1]`` is each table entry's value among the query's ``ids`` (0 when
        absent or padding); cleared on exit."""
        if len(self._marks) <= len(self._vocabulary):
            self._marks = np.zeros(2 * len(self._vocabulary) + 1, np.int64)
        return _QueryMarks(self._marks, ids + 1, values)

    def skills(self, slot: int) -> np.ndarray:
        """The slot's sorted skill ids."""
        overflow = self.skill_overflow.get(slot)
        if overflow is not None:
            return overflow
        return self.skill_table[slot, : self.skill_count[slot]].astype(np.int64)

    def title(self, slot: int) -> tuple[np.ndarray, np.ndarray]:
        """The slot's sorted title token ids and their counts."""
        overflow = self.title_overflow.get(slot)
        if overflow is not None:
            return overflow
        length = self.title_length[slot]
        return self.title_table[slot, :length].astype(np.int64), self.title_count_table[slot, :length].astype(np.int64)

    def slots(self, users: Sequence[int], source: RankingSource, ids: np.ndarray | None = None) -> np.ndarray:
        """The users' slots for their current profiles (parsed when new or changed; 0 for no profile). The
        slots of one call stay valid together: a reset happens only before it starts. ``ids``: the same users
        as an int64 array, when at hand (the held slots are then found in one binary search)."""
        if len(self._slot_of) + len(users) > self.max_users:
            self._reset()
        slot_of = self._slot_of
        if ids is not None and implements(source, ProfileIdentitySource):
            # The identities in one gather; profile objects only for the users whose identity differs from the
            # one parsed (new users, changed profiles, or an equal copy read again: its identity is then kept).
            held = self._slot_of.rows(ids)
            same = source.profile_identities_of(ids) == self._object_id[held]
            out = np.where(same, held, 0)
            differ = np.flatnonzero(~same)
            if len(differ):
                self._take(out, differ, [users[i] for i in differ.tolist()], source.profiles_of(ids[differ]))
            return out
        current = (source.profiles_of(ids) if ids is not None and implements(source, IdArraySource)
                   else source.many_profiles(users) if implements(source, BatchReadSource)
                   else list(map(source.profile, users)))
        n = len(users)
        held = (self._slot_of.rows(ids) if ids is not None
                else np.fromiter(map(slot_of.mapping.get, users, repeat(0)), np.int64, n))
        # The source usually hands back the very object parsed last time: compare identities in one pass. The
        # cache keeps a reference to every slot's profile, so an equal id() is that same, live object (and a
        # user without a slot whose profile is None matches slot 0, "no profile").
        same = np.fromiter(map(id, current), np.uint64, n) == self._object_id[held]
        out = np.where(same, held, 0)
        differ = np.flatnonzero(~same)
        self._take(out, differ, [users[i] for i in differ.tolist()], [current[i] for i in differ.tolist()])
        return out

    def _take(self, out: np.ndarray, positions: np.ndarray, users: list[int], current: list[Profile | None]) -> None:
        """``out[positions]``: the slots of ``users`` for their ``current`` profiles, parsed where new or changed.
        An equal copy of the parsed profile keeps its slot and becomes the held object (the source hands it back
        next time: the identity test then holds)."""
        slot_of, profiles = self._slot_of, self._profiles
        for i, user, profile in zip(positions.tolist(), users, current, strict=True):
            if profile is None:
                out[i] = 0
                continue
            slot = slot_of.get(user)
            if slot is not None and profiles[slot] == profile:  # an equal copy
                out[i] = slot
                profiles[slot] = profile
                self._object_id[slot] = id(profile)
            else:
                out[i] = self._parse(user, profile)

    def profile(self, user: int) -> Profile | None:
        """The user's profile as last seen by :meth:`slots`."""
        slot = self._slot_of.get(user)
        return self._profiles[slot] if slot is not None else None


class _QueryMarks:
    def __init__(self, marks: np.ndarray, index: np.ndarray, values: np.ndarray | int) -> None:
        self.marks, self.index, self.values = marks, index, values

    def __enter__(self) -> np.ndarray:
        self.marks[self.index] = self.values
        return self.marks

    def __exit__(self, *_: object) -> None:
        self.marks[self.index] = 0


class FeatureBuilder:
    """Builds feature matrices; keep one per worker (it owns the :class:`ProfileCache`)."""

    def __init__(self, profile_cache: ProfileCache | None = None) -> None:
        self.profiles = profile_cache if profile_cache is not None else ProfileCache()
        # Whether the matrix gets the common-neighbour structure columns (all but the two CN shares): False when
        # the served ranker dropped them on validation (Ranker.reads_structure_columns), which then never reads
        # them (NaN in, the same scores out) — ~1 ms of a worker's list. Rows that are logged for training get
        # them anyway (:meth:`fill_structure`), so a retrained ranker can still choose them.
        self.structure = True

    def matrix(self, user: int, candidates: CandidateSet, source: RankingSource, as_of_ms: int) -> np.ndarray:
        """(len(candidates), N_FEATURES) float64 features of (user, each candidate) as of ``as_of_ms``."""
        ids = candidates.ids
        n = len(ids)
        out = np.zeros((n, N_FEATURES))
        if n == 0:
            return out
        id_list = ids.tolist()
        self._graph(user, candidates, id_list, source, out)
        self._behaviour(user, id_list, source, as_of_ms, out)
        self._profile(user, ids, id_list, source, out)
        self._embedding(user, ids, id_list, source, out)
        self._activity(user, ids, id_list, source, as_of_ms, out)
        self._resource_allocation(user, ids, id_list, source, out)
        self._structure(user, ids, id_list, source, out)
        return out

    def pair(self, user: int, candidate: int, source: RankingSource, as_of_ms: int) -> dict[str, float | None]:
        """The features of one pair by name (NaN as None), computed exactly as in :meth:`matrix`."""
        counts, scores = source.two_hop(user)
        candidates = CandidateSet(user, np.array([candidate], np.int64), np.array([counts.get(candidate, 0)]),
                                  np.array([scores.get(candidate, 0.0)]), np.array([np.nan]),
                                  np.array([candidate in counts]), np.array([False]))
        return feature_dict(self.matrix(user, candidates, source, as_of_ms)[0])

    def columns(self, user: int, candidates: CandidateSet, source: RankingSource, as_of_ms: int,
                groups: Sequence[str], out: np.ndarray, *, no_common_neighbours: bool = False) -> None:
        """Recompute only the named column groups (:data:`COLUMN_GROUPS`) of (user, each candidate) into ``out``
        (``len(candidates)`` rows), with the very code :meth:`matrix` runs: a row's value does not depend on
        which other rows are computed with it, so recomputing some rows or some groups gives :meth:`matrix`'s
        bits. The incremental lists (ranking/incremental.py) use it for the rows and columns an event changed.

        ``no_common_neighbours``: the caller knows that no candidate is a 2-hop user of ``user`` (the kept lists'
        new ANN and popular rows while their 2-hop rows are whole); the resource-allocation group is then the
        values :meth:`matrix` gives a row without a 2-path, written without reading the user's 2-hop set and
        circle (:meth:`_without_common_neighbours`; ~0.3 ms a call for one row)."""
        ids = candidates.ids
        if len(ids) == 0:
            return
        id_list = ids.tolist()
        for group in groups:
            if group == "graph":
                self._graph(user, candidates, id_list, source, out)
            elif group == "behaviour":
                out[:, list(COLUMN_GROUPS["behaviour"])] = 0.0
                self._behaviour(user, id_list, source, as_of_ms, out)
            elif group == "profile":
                out[:, list(COLUMN_GROUPS["profile"])] = 0.0
                self._profile(user, ids, id_list, source, out)
            elif group == "embedding":
                self._embedding(user, ids, id_list, source, out)
            elif group == "activity":
                self._activity(user, ids, id_list, source, as_of_ms, out)
            elif group == "resource_allocation" and no_common_neighbours:
                self._without_common_neighbours(source, out)
            elif group == "resource_allocation":
                self._resource_allocation(user, ids, id_list, source, out)
                self._structure(user, ids, id_list, source, out)
            else:
                raise ValueError(f"unknown column group {group!r}")

    # ---- column groups ------------------------------------------------------------------------------------------
    @staticmethod
    def _graph(user: int, candidates: CandidateSet, id_list: list[int], source: RankingSource,
               out: np.ndarray) -> None:
        n = len(id_list)
        counts = candidates.common_neighbor_count.astype(np.float64)
        query_degree = float(source.degree(user))
        degrees = candidate_degrees(candidates.ids, id_list, source)
        union = query_degree + degrees - counts
        out[:, 0] = counts
        out[:, 1] = candidates.adamic_adar_score
        out[:, 2] = np.divide(counts, union, out=np.zeros(n), where=union > 0)
        out[:, 3] = np.where(counts > 0, 2.0, 3.0)
        out[:, 4] = math.log1p(query_degree)
        out[:, 5] = _log1p_table(int(degrees.max()))[degrees.astype(np.int64)]
        out[:, _SHARE_OF_CANDIDATE] = np.divide(counts, degrees, out=np.zeros(n), where=degrees > 0)
        out[:, _SHARE_OF_QUERY] = counts / query_degree if query_degree > 0 else 0.0

    @staticmethod
    def _behaviour(user: int, id_list: list[int], source: RankingSource, as_of_ms: int, out: np.ndarray) -> None:
        out[:, 7] = np.nan
        views = source.profile_views(user)
        engaged = source.co_engaged_counts(user)
        if not views and not engaged:
            return
        row_of = {u: i for i, u in enumerate(id_list)}
        # Walk the smaller side: a user's view map is usually much smaller than the candidate list.
        for other, (count_out, count_in, latest) in _matches(views, row_of):
            i = row_of[other]
            out[i, 6] = count_out
            out[i, 7] = max(0, as_of_ms - latest) / DAY_MS
            out[i, 8] = min(count_out, count_in)
        for other, count in _matches(engaged, row_of):
            out[row_of[other], 9] = count

    def _profile(self, user: int, ids: np.ndarray, id_list: list[int], source: RankingSource, out: np.ndarray) -> None:
        cache = self.profiles
        all_slots = cache.slots([user, *id_list], source, np.concatenate([np.array([user], np.int64), ids]))
        query, slots = int(all_slots[0]), all_slots[1:]
        for column, field in ((10, cache.company), (11, cache.school), (12, cache.industry)):
            value = field[query]
            if value >= 0:
                out[:, column] = field[slots] == value

        query_skills = cache.skills(query)
        if len(query_skills):
            counts = cache.skill_count[slots]
            with cache.query_marks(query_skills, 1) as marks:
                common = marks[cache.skill_table[slots] + 1].sum(axis=1)  # padding (-1) reads marks[0], 0
            for i in np.flatnonzero(counts > cache.MAX_PADDED).tolist():
                common[i] = len(np.intersect1d(cache.skills(int(slots[i])), query_skills, assume_unique=True))
            union = len(query_skills) + counts - common
            out[:, 13] = np.divide(common, union, out=np.zeros(len(slots)), where=counts > 0)

        query_tokens, query_counts = cache.title(query)
        if len(query_tokens):
            with cache.query_marks(query_tokens, query_counts) as counts_of_query:
                # Σ over the candidate's tokens of its count × the query's (0 for tokens the query lacks): integers
                dot = (cache.title_count_table[slots] * counts_of_query[cache.title_table[slots] + 1]).sum(axis=1)
            for i in np.flatnonzero(cache.title_length[slots] > cache.MAX_PADDED).tolist():
                ids, counts = cache.title(int(slots[i]))
                _, mine, theirs = np.intersect1d(query_tokens, ids, assume_unique=True, return_indices=True)
                dot[i] = int((query_counts[mine] * counts[theirs]).sum())
            norm = cache.title_norm[query] * cache.title_norm[slots]
            out[:, 14] = np.minimum(1.0, np.divide(dot, norm, out=np.zeros(len(slots)), where=norm > 0))

        lat1, lon1 = cache.lat[query], cache.lon[query]
        if np.isnan(lat1):
            out[:, 15] = np.nan
        else:
            lat2, lon2 = cache.lat[slots], cache.lon[slots]
            # haversine_km, operation by operation.
            phi1, phi2 = lat1 * _DEG_TO_RAD, lat2 * _DEG_TO_RAD
            dphi, dlmb = phi2 - phi1, (lon2 - lon1) * _DEG_TO_RAD
            h = np.sin(dphi / 2) ** 2 + math.cos(phi1) * np.cos(phi2) * np.sin(dlmb / 2) ** 2
            out[:, 15] = 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.minimum(1.0, h)))

    @staticmethod
    def _resource_allocation(user: int, ids: np.ndarray, id_list: list[int], source: RankingSource,
                             out: np.ndarray) -> None:
        column = FEATURE_INDEX["resource_allocation_score"]
        if not implements(source, ResourceAllocationSource):
            out[:, column] = np.nan
            return
        if implements(source, TwoHopArraySource):  # the arrays Stage 1 just read: a binary search, no dict
            held = source.two_hop_arrays(user)
            ids = np.asarray(ids, np.int64)
            if not len(held.ids):
                out[:, column] = 0.0
                return
            at = np.minimum(np.searchsorted(held.ids, ids), len(held.ids) - 1)
            out[:, column] = np.where(held.ids[at] == ids, held.resource_allocation[at], 0.0)
            return
        allocation = source.two_hop_resource_allocation(user)
        get = allocation.get
        # 0 for candidates without a common neighbour (not in the 2-hop set), as for AA.
        out[:, column] = np.fromiter(map(get, id_list, repeat(0.0)), np.float64, len(id_list))

    def _without_common_neighbours(self, source: RankingSource, out: np.ndarray) -> None:
        """The resource-allocation group of rows without a common neighbour, as :meth:`_resource_allocation` and
        :meth:`_structure` write it: no allocation (0; NaN from a source without it); no common neighbour in any
        degree band, no 3-path through the circle, no embeddedness (0), the smallest and largest degree of none
        (NaN); all NaN where the structure is not computed."""
        column = FEATURE_INDEX["resource_allocation_score"]
        out[:, column] = 0.0 if implements(source, ResourceAllocationSource) else np.nan
        # the structure of a circle none of the rows reaches: the values structure_columns gives such a row
        self._structure(-1, np.zeros(len(out), np.int64), [], source, out, ego=EgoAdjacency.empty())

    def _structure(self, user: int, ids: np.ndarray, id_list: list[int], source: RankingSource,
                   out: np.ndarray, computed: bool | None = None, ego: EgoAdjacency | None = None) -> None:
        first = FEATURE_INDEX[STRUCTURE_FEATURES[0]]
        width = len(STRUCTURE_FEATURES) - 2  # the CN shares are the graph group's (see COLUMN_GROUPS)
        if not (self.structure if computed is None else computed) or not implements(source, EgoAdjacencySource):
            out[:, first : first + width] = np.nan
            return
        out[:, first : first + width] = structure_columns(source.ego_adjacency(user) if ego is None else ego, ids)

    def fill_structure(self, user: int, ids: np.ndarray, source: RankingSource, out: np.ndarray) -> None:
        """The structure columns of the rows ``out`` (one per id), computed whatever :attr:`structure` says: for
        the rows logged as impressions when the matrix went without them."""
        if len(ids):
            self._structure(user, ids, ids.tolist(), source, out, computed=True)

    @staticmethod
    def _activity(user: int, ids: np.ndarray, id_list: list[int], source: RankingSource, as_of_ms: int,
                  out: np.ndarray) -> None:
        first = SEED_FEATURES
        if not implements(source, ActivitySource):
            out[:, first : first + len(ACTIVITY_FEATURES)] = np.nan
            return
        activity_of, last_of = source.connection_activity, source.last_connection_ts
        n = len(id_list)
        scales = len(ACTIVITY_TIME_CONSTANTS_MS)
        if implements(source, ActivityTableSource) or implements(source, IdArraySource):
            write_candidate_activity(activity_table_for(source, ids, id_list), as_of_ms, out, first)
        else:
            out[:, first : first + scales] = np.array([activity_of(u, as_of_ms) for u in id_list],
                                                      np.float64).reshape(n, scales)
            last = np.array([np.nan if (ts := last_of(u)) is None else ts for u in id_list], np.float64)
            out[:, first + 3] = np.maximum(0.0, as_of_ms - last) / DAY_MS  # NaN stays NaN
        out[:, first + 4] = activity_of(user, as_of_ms)[1]
        query_last = last_of(user)
        out[:, first + 5] = np.nan if query_last is None else max(0, as_of_ms - query_last) / DAY_MS

    @staticmethod
    def _embedding(user: int, ids: np.ndarray, id_list: list[int], source: RankingSource, out: np.ndarray) -> None:
        query = source.embedding(user)
        if query is None:
            out[:, 16] = np.nan
            return
        query = np.asarray(query, np.float32)
        vectors = np.asarray(source.embeddings_of(ids) if implements(source, IdArraySource)
                             else source.embeddings(id_list), np.float32)
        # Divide by the norms even though the source promises unit vectors: a cosine must stay a cosine.
        # einsum, not @: a matrix-vector product may go to a multi-threaded BLAS, and ranking runs on one core.
        norms = np.sqrt(np.einsum("ij,ij->i", vectors, vectors)) * np.float32(np.sqrt(np.dot(query, query)))
        with np.errstate(invalid="ignore", divide="ignore"):
            cosine = np.einsum("ij,j->i", vectors, query) / norms
        out[:, 16] = np.clip(cosine, -1.0, 1.0)


def candidate_degrees(ids: np.ndarray, id_list: list[int], source: RankingSource) -> np.ndarray:
    """The candidates' current degrees as float64, by the cheapest read the source offers."""
    if implements(source, IdArraySource):
        return source.degrees_of(ids).astype(np.float64)
    if implements(source, BatchReadSource):
        return np.asarray(source.many_degrees(id_list), np.float64)
    return np.fromiter(map(source.degree, id_list), np.float64, len(id_list))


# Upper ends of the common neighbours' degree bands of cn_degree_1_4 … cn_degree_over_64 (a factor 4 apart: a
# friend with 3 friends says far more about two people than one with 300, which RA and AA weigh smoothly)
CN_DEGREE_BANDS: tuple[int, ...] = (4, 16, 64)
_BAND_UPPER = np.array(CN_DEGREE_BANDS, np.int64)


def structure_columns(ego: EgoAdjacency, ids: np.ndarray) -> np.ndarray:
    """(len(ids), 8) structure of the query user's common neighbours z with each candidate c, from the adjacency
    of the user's neighbours (``ego``), in :data:`STRUCTURE_FEATURES` order (its last two, the CN shares, are
    computed with the graph columns from the candidates' degrees):

    * ``cn_degree_1_4`` … ``cn_degree_over_64``: how many z have a degree in each band of
      :data:`CN_DEGREE_BANDS` (their sum is the common-neighbour count);
    * ``cn_min_degree``, ``cn_max_degree``: the smallest and largest deg z (NaN without a common neighbour);
    * ``ego_three_path_count``: Σ_z |N(z) ∩ N(user)|, the paths user → a → z → c of length 3 whose middle
      users are both the user's friends: common neighbours inside the user's circle count more. (The full
      3-path count also needs the rows of users two hops away, which a partition does not hold.)
    * ``cn_ego_embeddedness``: Σ_z |N(z) ∩ N(user)| / deg z, the share of each z's friends who are the user's.

    Integer counts are exact; the two float sums add one term per common neighbour in the neighbours' id order
    (``np.bincount`` adds in input order), so every source that hands the same rows gets the same bits. Cost: one
    pass of C over the Σ deg z 2-paths (``structure_columns`` in ``tree_eval.c``, ~0.05 ms for a 2,000-row list),
    or, where the library cannot be built, a few numpy passes (~0.4 ms) that give the same bits."""
    from pymk.ranking.tree_eval import feature_kernels  # here: tree_eval imports xgboost

    library = feature_kernels()
    n = len(ids)
    if library is not None and n and len(ego.middles):
        ids64 = np.ascontiguousarray(ids, np.int64)
        middles, sizes, others = (np.ascontiguousarray(a, np.int64) for a in ego)
        out = np.empty((n, len(STRUCTURE_FEATURES) - 2))
        if library.structure_columns(n, ids64.ctypes.data, len(middles), middles.ctypes.data, sizes.ctypes.data,
                                     others.ctypes.data, _BAND_UPPER.ctypes.data, len(_BAND_UPPER),
                                     out.ctypes.data, out.shape[1]) == 0:
            return out
    return structure_columns_numpy(ego, ids)


def structure_columns_numpy(ego: EgoAdjacency, ids: np.ndarray) -> np.ndarray:
    """:func:`structure_columns` in numpy: the fallback, and the reference the compiled pass is tested against."""
    n = len(ids)
    bands = len(CN_DEGREE_BANDS) + 1
    out = np.zeros((n, len(STRUCTURE_FEATURES) - 2))
    out[:, bands : bands + 2] = np.nan
    m = len(ego.middles)
    if n == 0 or m == 0:
        return out
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    position = np.minimum(np.searchsorted(sorted_ids, ego.others), n - 1)
    hit = sorted_ids[position] == ego.others
    middle_of = np.repeat(np.arange(m), ego.sizes)
    rows, middles = order[position[hit]], middle_of[hit]  # one (candidate row, middle) per 2-path to a candidate
    degrees = ego.sizes.astype(np.float64)
    band = np.searchsorted(np.array(CN_DEGREE_BANDS), ego.sizes, side="left")
    out[:, :bands] = np.bincount(rows * bands + band[middles], minlength=n * bands).reshape(n, bands)
    counts = out[:, :bands].sum(axis=1)
    present = counts > 0
    smallest = np.full(n, np.inf)
    largest = np.full(n, -np.inf)
    np.minimum.at(smallest, rows, degrees[middles])
    np.maximum.at(largest, rows, degrees[middles])
    out[present, bands] = smallest[present]
    out[present, bands + 1] = largest[present]
    # |N(z) ∩ N(user)| per neighbour z: its neighbours that are among the user's (middles is sorted)
    inside = np.minimum(np.searchsorted(ego.middles, ego.others), m - 1)
    in_circle = np.bincount(middle_of, weights=(ego.middles[inside] == ego.others), minlength=m)
    out[:, bands + 2] = np.bincount(rows, weights=in_circle[middles], minlength=n)
    share = np.divide(in_circle, degrees, out=np.zeros(m), where=degrees > 0)
    out[:, bands + 3] = np.bincount(rows, weights=share[middles], minlength=n)
    return out


_IMPLEMENTS: dict[tuple[type, type], bool] = {}


def implements(source: object, protocol: type) -> bool:
    """``isinstance(source, protocol)`` for the runtime-checkable source protocols, remembered per class: the
    protocol check walks every member (~10 µs), and the matrix asks it several times per list."""
    key = (type(source), protocol)
    held = _IMPLEMENTS.get(key)
    if held is None:
        held = _IMPLEMENTS[key] = isinstance(source, protocol)
    return held


def activity_table_for(source: RankingSource, ids: np.ndarray, id_list: list[int]) -> ActivityTable:
    """The held activity of the candidates, as :meth:`FeatureBuilder.matrix` reads it (the source must be an
    :class:`ActivityTableSource` or an :class:`IdArraySource`)."""
    if implements(source, IdArraySource):
        return source.activity_table_of(ids)
    assert implements(source, ActivityTableSource)
    return source.activity_table(id_list)


def candidate_activity_columns(table: ActivityTable, as_of_ms: int) -> np.ndarray:
    """(n, 4) candidate activity columns (the 3 decayed counts, days since the latest change) as of ``as_of_ms``,
    as :meth:`FeatureBuilder.matrix` computes them from ``table``."""
    out = np.empty((len(table.known), len(ACTIVITY_TIME_CONSTANTS_MS) + 1))
    out[:, :-1] = decayed_activity(table, as_of_ms)
    last = np.where(table.known, table.anchors.astype(np.float64), np.nan)
    out[:, -1] = np.maximum(0.0, as_of_ms - last) / DAY_MS
    return out


_TAUS = np.array(ACTIVITY_TIME_CONSTANTS_MS, np.int64)
assert len(_TAUS) == 3  # tree_eval.c's activity_columns writes three decayed counts


def write_candidate_activity(table: ActivityTable, as_of_ms: int, out: np.ndarray, column: int) -> None:
    """:func:`candidate_activity_columns` written into ``out[:, column : column + 4]``: one pass of C over the rows
    where the feature library is built (``activity_columns`` in tree_eval.c: libm's exp, the same bits; ~20× the
    speed of a math.exp call per distinct age), numpy and math.exp otherwise."""
    from pymk.ranking.tree_eval import feature_kernels  # here: tree_eval imports xgboost

    library = feature_kernels()
    n = len(table.known)
    if library is not None and n and out.dtype == np.float64 and out.flags.c_contiguous:
        values = np.ascontiguousarray(table.values, np.float64)
        anchors = np.ascontiguousarray(table.anchors, np.int64)
        known = np.ascontiguousarray(table.known, bool)
        library.activity_columns(n, values.ctypes.data, anchors.ctypes.data, known.ctypes.data, int(as_of_ms),
                                 _TAUS.ctypes.data, out.ctypes.data, out.shape[1], column)
        return
    out[:, column : column + len(_TAUS) + 1] = candidate_activity_columns(table, as_of_ms)


def view_columns(user: int, ids: np.ndarray, source: RankingSource, order: np.ndarray | None = None,
                 views: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The behavioural columns of :meth:`FeatureBuilder.matrix` that do not move with the as-of time, for the
    candidates ``ids`` (``order``: ``np.argsort(ids)`` when at hand): (n, 3) views user → candidate, mutual
    views, co-engaged items (columns 6, 8, 9), and per row the latest view either way (int64) and whether there
    is one; the recency column is :func:`view_recency_days` of them. The user's view and engagement maps are
    looked up in the sorted ids (they are usually far smaller than the list). ``views=False``: the engagements
    only (the view parts stay 0)."""
    if not len(ids):
        return view_columns_of_maps(ids, ids, None, None)
    order = np.argsort(ids, kind="stable") if order is None else order
    return view_columns_of_maps(ids, order, source.profile_views(user) if views else None,
                                source.co_engaged_counts(user))


def view_columns_of_maps(ids: np.ndarray, order: np.ndarray, views: Mapping[int, Any] | None,
                         engaged: Mapping[int, int] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`view_columns` from the user's maps at hand (``order`` = ``np.argsort(ids)``; a map not given counts
    as empty): a kept list holds the maps while they do not change (ranking/incremental.py)."""
    n = len(ids)
    values = np.zeros((n, 3))
    latest = np.zeros(n, np.int64)
    has_view = np.zeros(n, bool)
    if n == 0:
        return values, latest, has_view
    if n <= _FEW_IDS:  # a few rows (an update's new or moved ones): their map entries, not a pass over both maps
        for row, other in enumerate(ids.tolist()):
            held = views.get(other) if views else None
            if held is not None:
                values[row, 0], values[row, 1] = held[0], min(held[0], held[1])
                latest[row], has_view[row] = held[2], True
            values[row, 2] = engaged.get(other, 0) if engaged else 0
        return values, latest, has_view
    sorted_ids = ids[order]

    def rows_of(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        position = np.minimum(np.searchsorted(sorted_ids, keys), n - 1)
        hit = sorted_ids[position] == keys
        return np.flatnonzero(hit), order[position[hit]]

    if views:
        keys = np.fromiter(views.keys(), np.int64, len(views))
        held = np.array(list(views.values()), np.int64).reshape(len(views), 3)
        found, rows = rows_of(keys)
        values[rows, 0] = held[found, 0]
        values[rows, 1] = np.minimum(held[found, 0], held[found, 1])
        latest[rows] = held[found, 2]
        has_view[rows] = True
    if engaged:
        keys = np.fromiter(engaged.keys(), np.int64, len(engaged))
        counts = np.fromiter(engaged.values(), np.int64, len(engaged))
        found, rows = rows_of(keys)
        values[rows, 2] = counts[found]
    return values, latest, has_view


_FEW_IDS = 32  # up to this many ids, view_columns_of_maps reads their map entries (the same integers)


def view_recency_days(latest: np.ndarray, has_view: np.ndarray, as_of_ms: int) -> np.ndarray:
    """``profile_view_recency_days`` as :meth:`FeatureBuilder.matrix` computes it (NaN without a view): int64
    differences below 2⁵³ convert exactly, and IEEE division rounds as Python's int true division does."""
    return np.where(has_view, np.maximum(0, as_of_ms - latest) / DAY_MS, np.nan)


def decayed_activity(table: ActivityTable, as_of_ms: int) -> np.ndarray:
    """(n, scales) activity of ``table``'s users as of ``as_of_ms``: bit for bit
    :func:`~pymk.features.activity.activity_at` (value × math.exp(−max(0, as_of − anchor)/τ), 0 for unknown users).
    The factors go through math.exp, once per distinct age: numpy's vectorised exp may differ from libm's in
    the last bit, and the per-pair debug API and the offline sources use math.exp."""
    values, known = table.values, table.known
    out = np.zeros((len(known), len(ACTIVITY_TIME_CONSTANTS_MS)))
    if not known.any():
        return out
    ages, inverse = np.unique(np.maximum(as_of_ms - table.anchors[known], 0), return_inverse=True)
    for column, tau in enumerate(ACTIVITY_TIME_CONSTANTS_MS):
        # −age / τ in float64 is activity_at's int true division: both operands are exact doubles (< 2⁵³), and
        # IEEE division rounds the exact quotient as Python's int division does. Only exp must be libm's.
        factors = np.fromiter(map(math.exp, (-ages / tau).tolist()), np.float64, len(ages))
        out[known, column] = values[known, column] * factors[inverse]
    return out


_LOG1P = np.array([math.log1p(d) for d in range(4096)])


def _log1p_table(largest: int) -> np.ndarray:
    """math.log1p(d) for d = 0..largest: numpy's vectorised log1p can differ from libm's in the last bit, and
    the worker's debug API uses math.log1p."""
    global _LOG1P
    if largest >= len(_LOG1P):
        size = max(largest + 1, 2 * len(_LOG1P))
        _LOG1P = np.concatenate([_LOG1P, [math.log1p(d) for d in range(len(_LOG1P), size)]])
    return _LOG1P


def _matches(mapping: Mapping[int, _V], row_of: dict[int, int]) -> Iterator[tuple[int, _V]]:
    """(key, value) pairs of ``mapping`` whose key is a candidate, walking the smaller of the two."""
    if len(mapping) <= len(row_of):
        return ((k, v) for k, v in mapping.items() if k in row_of)
    return ((k, mapping[k]) for k in row_of if k in mapping)


def feature_dict(row: np.ndarray) -> dict[str, float | None]:
    """A feature row by name, JSON-ready (NaN → None, integers stay integral floats)."""
    return {name: (None if math.isnan(value) else value) for name, value in zip(FEATURE_NAMES, row.tolist(),
                                                                                  strict=True)}
