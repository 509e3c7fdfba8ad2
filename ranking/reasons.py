"""Reasons for a shown recommendation: a JSON-ready dict per item (no NaN, plain ints/floats/strings).

    {"mutual_connections": 12, "mutual_examples": [7, 3, 41],
     "shared": ["company"], "company": "Acme",
     "similar_profile": true, "cosine": 0.83,                       (only for ANN-sourced items)
     "active_recently": true,                                       (only for items of the "popular" source)
     "top_features": [{"feature": "adamic_adar_score", "contribution": 1.92, "value": 3.4}, ...],
     "text": "12 mutual connections · both at Acme"}

``mutual_examples``: up to 3 common neighbours, those with the highest degree first, ties by lower id (the
best-known mutual friends, deterministic). ``top_features``: the (at most) 3 features with the largest
positive contribution to this item's score, from the scorer's :meth:`~pymk.ranking.source.Scorer.explain`
(TreeSHAP for the model, the additive terms for the heuristic), computed for the shown rows only.
"""

from __future__ import annotations

import heapq
import math
from typing import Any

import numpy as np
from pymk.ranking.candidates import ANN, POPULAR
from pymk.ranking.features import FEATURE_INDEX, FEATURE_NAMES, ProfileCache
from pymk.ranking.source import RankingSource

MAX_EXAMPLES = 3
TOP_FEATURES = 3
_SHARED_FIELDS = (("company", "same_company_current"), ("school", "same_school"), ("industry", "same_industry"))


class MutualDegrees:
    """Degrees of the query user's neighbours, looked up once per ranked list (every item's mutual friends
    are among them)."""

    def __init__(self, source: RankingSource) -> None:
        self.source = source
        self._degrees: dict[int, int] = {}

    def __call__(self, user: int) -> int:
        degree = self._degrees.get(user)
        if degree is None:
            degree = self._degrees[user] = self.source.degree(user)
        return degree


def mutual_examples(user: int, candidate: int, source: RankingSource, degree_of: MutualDegrees | None = None,
                    limit: int = MAX_EXAMPLES) -> list[int]:
    """Up to ``limit`` common neighbours, highest degree first, ties by lower id."""
    degree_of = degree_of or MutualDegrees(source)
    common = source.common_neighbors(user, candidate)
    return [int(z) for z in heapq.nsmallest(limit, common, key=lambda z: (-degree_of(z), z))]


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def build_reasons(user: int, candidate: int, sources: tuple[str, ...], ann_score: float | None,
                  features: np.ndarray, contributions: np.ndarray, source: RankingSource,
                  profiles: ProfileCache, degree_of: MutualDegrees | None = None) -> dict[str, Any]:
    """The reasons of one shown item from its feature row and its per-feature contributions (both (17,))."""
    mutual = int(features[FEATURE_INDEX["common_neighbor_count"]])
    reasons: dict[str, Any] = {
        "mutual_connections": mutual,
        "mutual_examples": mutual_examples(user, candidate, source, degree_of) if mutual else [],
    }
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

    top: list[dict[str, Any]] = []
    for index in np.argsort(-contributions, kind="stable")[:TOP_FEATURES].tolist():
        contribution = round(float(contributions[index]), 4)
        if not contribution > 0:  # only evidence for the candidate (and visible at 4 decimals)
            break
        value = float(features[index])
        top.append({"feature": FEATURE_NAMES[index], "contribution": contribution,
                    "value": None if math.isnan(value) else round(value, 4)})
    reasons["top_features"] = top
    reasons["text"] = reason_text(reasons, features)
    return reasons


def reason_text(reasons: dict[str, Any], features: np.ndarray) -> str:
    """A short human sentence, most convincing evidence first, at most three parts."""
    parts: list[str] = []
    if reasons["mutual_connections"]:
        parts.append(_plural(reasons["mutual_connections"], "mutual connection"))
    phrases = {"company": "both at {}", "school": "both studied at {}", "industry": "both in {}"}
    generic = {"company": "same company", "school": "same school", "industry": "same industry"}
    for name in reasons["shared"]:
        value = reasons.get(name)
        parts.append(phrases[name].format(value) if value else generic[name])
    if features[FEATURE_INDEX["mutual_profile_views"]] > 0:
        parts.append("you viewed each other's profiles")
    elif features[FEATURE_INDEX["query_viewed_candidate_profile"]] > 0:
        parts.append("you viewed their profile")
    if features[FEATURE_INDEX["co_engaged_with_content"]] > 0:
        parts.append("engaged with the same posts")
    if reasons.get("similar_profile") and not reasons["mutual_connections"]:
        parts.append("similar profile")
    if reasons.get("active_recently") and not reasons["mutual_connections"]:
        parts.append("active lately")
    return " · ".join(parts[:3]) if parts else "suggested for you"
