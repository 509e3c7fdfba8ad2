"""Reasons for a shown recommendation: a JSON-ready dict per item (no NaN, plain ints/floats/strings).

    {"mutual_connections": 12, "mutual_examples": [7, 3, 41],
     "shared": ["company"], "company": "Acme",
     "similar_profile": true, "cosine": 0.83,                       (only for ANN-sourced items)
     "active_recently": true,                                       (only for items of the "popular" source)
     "top_features": [{"feature": "adamic_adar_score", "contribution": 1.92, "value": 3.4}, ...],
     "text": "12 mutual connections · both at Acme"}

``mutual_examples``: up to 3 common neighbours, those with the highest degree first, ties by lower id (the
best-known mutual friends, deterministic). ``top_features``: the (at most) 3 features that most separate this
item from the rest of its list: the scorer's per-feature contributions (:meth:`~pymk.ranking.source.Scorer.explain`:
Saabas for the model, the additive terms for the heuristic, computed for the shown rows only) minus the mean
contribution of that feature over the shown list (:func:`list_relative_contributions`), the largest positive
first. Features about the query user alone, and features whose value is the same on every shown item, are never
a reason: they move every score alike and say nothing about why *this* person is suggested. ``text`` puts the
evidence in that order too: the part whose features separate the item most comes first.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pymk.ranking.candidates import ANN, POPULAR
from pymk.ranking.features import FEATURE_INDEX, FEATURE_NAMES, ProfileCache, implements
from pymk.ranking.source import BatchReadSource, RankingSource

MAX_EXAMPLES = 3
TOP_FEATURES = 3
_SHARED_FIELDS = (("company", "same_company_current"), ("school", "same_school"), ("industry", "same_industry"))


class MutualDegrees:
    """Degrees of the query user's neighbours, looked up once per ranked list (every item's mutual friends
    are among them); :meth:`prefetch` reads a whole list's in one batch call."""

    def __init__(self, source: RankingSource) -> None:
        self.source = source
        self._negative: dict[int, int] = {}  # user → −degree: a sort key at C speed (no lambda per element)

    def negative(self, user: int) -> int:
        value = self._negative.get(user)
        if value is None:
            value = self._negative[user] = -self.source.degree(user)
        return value

    def prefetch(self, users: Iterable[int]) -> bool:
        """Reads the degrees of ``users`` not held yet in one call; False when the source has no batch read (each is
        then read when first asked)."""
        if not implements(self.source, BatchReadSource):
            return False
        missing = [z for z in dict.fromkeys(users) if z not in self._negative]
        if missing:
            self._negative.update(zip(missing, (-self.source.many_degrees(missing)).tolist(), strict=True))
        return True

    def examples(self, common: Iterable[int], limit: int = MAX_EXAMPLES) -> list[int]:
        """Up to ``limit`` of ``common``, highest degree first, ties by lower id."""
        common = sorted(common)
        key = self._negative.__getitem__ if self.prefetch(common) else self.negative
        # stable: equal degrees keep the ascending id order of the first sort
        return [int(z) for z in sorted(common, key=key)[:limit]]


def mutual_examples(user: int, candidate: int, source: RankingSource, degree_of: MutualDegrees | None = None,
                    limit: int = MAX_EXAMPLES) -> list[int]:
    """Up to ``limit`` common neighbours, highest degree first, ties by lower id."""
    degree_of = degree_of or MutualDegrees(source)
    return degree_of.examples(source.common_neighbors(user, candidate), limit)


# Features of the query user alone: the same value on every candidate of a list, whatever the list
QUERY_ONLY_FEATURES = ("query_degree_log", "query_activity_7d", "query_days_since_last_connection")
_QUERY_ONLY = np.array([FEATURE_INDEX[name] for name in QUERY_ONLY_FEATURES])


def list_relative_contributions(rows: np.ndarray, contributions: np.ndarray) -> np.ndarray:
    """(n, F) contributions of the shown rows relative to their list: each minus the column's mean over the rows,
    NaN where a feature cannot be a reason (query-only, or one value on every row). A list of one item keeps its
    own contributions (nothing to compare with), query-only features still excluded."""
    relative = np.array(contributions[:, : rows.shape[1]], dtype=np.float64)
    if len(relative) == 0:
        return relative
    if len(relative) > 1:
        relative -= relative.mean(axis=0)
        missing = np.isnan(rows)
        low, high = np.where(missing, np.inf, rows).min(axis=0), np.where(missing, -np.inf, rows).max(axis=0)
        nan_count = missing.sum(axis=0)
        # constant: every value equal (NaN counts as a value: NaN on some rows and a number on others differs)
        constant = (nan_count == len(rows)) | ((nan_count == 0) & (low == high))
        relative[:, constant] = np.nan
    relative[:, _QUERY_ONLY] = np.nan
    return relative


# What each part of the text is evidence of: its strength is the largest relative contribution among these
_TEXT_EVIDENCE = {
    "mutual": ("common_neighbor_count", "adamic_adar_score", "jaccard_sim", "resource_allocation_score",
               "graph_distance_bucket"),
    "company": ("same_company_current",), "school": ("same_school",), "industry": ("same_industry",),
    "views": ("mutual_profile_views", "query_viewed_candidate_profile", "profile_view_recency_days"),
    "engaged": ("co_engaged_with_content",),
    "similar": ("gnn_embedding_cosine_sim", "title_cosine_sim", "skill_jaccard_sim", "geo_distance_km"),
    "active": ("candidate_activity_1d", "candidate_activity_7d", "candidate_activity_30d",
               "candidate_days_since_last_connection"),
}
_TEXT_EVIDENCE_INDEX = {part: np.array([FEATURE_INDEX[name] for name in names])
                        for part, names in _TEXT_EVIDENCE.items()}


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


@dataclass(frozen=True)
class ListEvidence:
    """What sets each shown item apart, for a whole list at once (a few numpy calls per list instead of per item):
    the list-relative contributions with -inf where a feature is never a reason, each row's strongest features,
    and each row's strength of each kind of evidence the text can name."""

    relative: np.ndarray  # (n, F)
    top: np.ndarray  # (n, TOP_FEATURES) column indices, strongest first (ties: lower index)
    strength: dict[str, np.ndarray]  # evidence kind → (n,)

    @classmethod
    def of(cls, rows: np.ndarray, contributions: np.ndarray) -> ListEvidence:
        relative = list_relative_contributions(rows, contributions)
        relative = np.where(np.isnan(relative), -np.inf, relative)
        top = np.argsort(-relative, axis=1, kind="stable")[:, :TOP_FEATURES]
        strength = {kind: relative[:, columns].max(axis=1) if len(relative) else np.empty(0)
                    for kind, columns in _TEXT_EVIDENCE_INDEX.items()}
        return cls(relative, top, strength)

    def rows(self) -> list[tuple[list[float], list[int], dict[str, float]]]:
        """Every row's relative contributions, strongest features and strengths, as plain lists (the same floats)."""
        strengths = [dict(zip(self.strength, values, strict=True))
                     for values in zip(*(v.tolist() for v in self.strength.values()), strict=True)]
        return list(zip(self.relative.tolist(), self.top.tolist(), strengths, strict=True))


def build_reasons(user: int, candidate: int, sources: tuple[str, ...], ann_score: float | None,
                  features: np.ndarray, contributions: np.ndarray, source: RankingSource,
                  profiles: ProfileCache, degree_of: MutualDegrees | None = None,
                  top_indices: np.ndarray | Sequence[int] | None = None, strength: dict[str, float] | None = None,
                  examples: list[int] | None = None) -> dict[str, Any]:
    """The reasons of one shown item from its feature row and its list-relative contributions (both (F,); see
    :func:`list_relative_contributions`: NaN or -inf marks a feature that is never a reason). ``top_indices`` and
    ``strength``: the same row's :class:`ListEvidence`, computed for the list at once (else here); the row and
    the contributions may then be plain lists (``tolist()`` once per list: a numpy scalar read costs more than a
    list's). ``examples``: the mutual examples, when already found (:func:`mutual_examples`)."""
    mutual = int(features[FEATURE_INDEX["common_neighbor_count"]])
    if not mutual:
        examples = []
    elif examples is None:
        examples = mutual_examples(user, candidate, source, degree_of)
    reasons: dict[str, Any] = {"mutual_connections": mutual, "mutual_examples": examples}
    shared = [name for name, feature in _SHARED_FIELDS if features[FEATURE_INDEX[feature]] >= 1]
    reasons["shared"] = shared
    query_profile = profiles.profile(user)
    for name in shared:  # the display value (the query user's spelling), for the text
        value = getattr(query_profile, name, None) if query_profile is not None else None
        if value:
            reasons[name] = value
    if POPULAR in sources:
        reasons["active_recently"] = True  # among the most active users (the "popular" source)
    if ANN in sources:
        reasons["similar_profile"] = True
        if ann_score is not None and math.isfinite(ann_score):
            reasons["cosine"] = round(float(ann_score), 4)

    if top_indices is None:
        relative = np.where(np.isnan(contributions), -np.inf, contributions)
        top_indices = np.argsort(-relative, kind="stable")[:TOP_FEATURES]
    else:
        relative = contributions  # ListEvidence's: -inf already where a feature is never a reason
    top: list[dict[str, Any]] = []
    for index in (top_indices.tolist() if isinstance(top_indices, np.ndarray) else top_indices):
        contribution = round(float(relative[index]), 4)
        if not contribution > 0:  # only evidence for the candidate (and visible at 4 decimals)
            break
        value = float(features[index])
        top.append({"feature": FEATURE_NAMES[index], "contribution": contribution,
                    "value": None if math.isnan(value) else round(value, 4)})
    reasons["top_features"] = top
    reasons["text"] = reason_text(reasons, features, relative, strength)
    return reasons


def reason_text(reasons: dict[str, Any], features: np.ndarray, relative: np.ndarray | None = None,
                strength: dict[str, float] | None = None) -> str:
    """A short human sentence of at most three parts, the strongest candidate-specific evidence first (the part
    whose features have the largest list-relative contribution; without contributions, the order below)."""
    parts: list[tuple[str, str]] = []  # (evidence kind, phrase), in the default order
    if reasons["mutual_connections"]:
        parts.append(("mutual", _plural(reasons["mutual_connections"], "mutual connection")))
    phrases = {"company": "both at {}", "school": "both studied at {}", "industry": "both in {}"}
    generic = {"company": "same company", "school": "same school", "industry": "same industry"}
    for name in reasons["shared"]:
        value = reasons.get(name)
        parts.append((name, phrases[name].format(value) if value else generic[name]))
    if features[FEATURE_INDEX["mutual_profile_views"]] > 0:
        parts.append(("views", "you viewed each other's profiles"))
    elif features[FEATURE_INDEX["query_viewed_candidate_profile"]] > 0:
        parts.append(("views", "you viewed their profile"))
    if features[FEATURE_INDEX["co_engaged_with_content"]] > 0:
        parts.append(("engaged", "engaged with the same posts"))
    weak = ("similar", "active")  # without contributions, said only when there is no mutual connection
    if reasons.get("similar_profile"):
        parts.append(("similar", "similar profile"))
    if reasons.get("active_recently"):
        parts.append(("active", "active lately"))
    if relative is not None and len(parts) > 1:
        if strength is None:
            strength = {kind: float(relative[_TEXT_EVIDENCE_INDEX[kind]].max()) for kind, _ in parts}
        parts.sort(key=lambda part: -strength[part[0]])  # stable: equal evidence keeps the default order
        # next to mutual connections, a weak part whose features do not set the item apart is not worth a place
        if reasons["mutual_connections"]:
            parts = [part for part in parts if part[0] not in weak or strength[part[0]] > 0]
    elif reasons["mutual_connections"]:
        parts = [part for part in parts if part[0] not in weak]
    return " · ".join(phrase for _, phrase in parts[:3]) if parts else "suggested for you"
