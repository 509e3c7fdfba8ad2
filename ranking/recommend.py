"""The ranking pipeline for one user: Stage 1 candidates → feature matrix → scores → top k with reasons.

Typed request and response, in the spirit of GraphJet's request/response objects: :class:`RecommendRequest`
in, :class:`RankedList` of :class:`RankedItem` out (convertible to the contract's
:class:`pymk.events.Recommendations` by :meth:`RankedList.to_recommendations`).

Final order: higher score, then higher candidate degree, then lower id (the contract's tie rule).
Invariants, whatever the scorer: the user, its connections and its (unexpired) dismissed and blocked
candidates never appear; at most k items, ranks 1..n.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pymk.events import RecommendationItem, Recommendations
from pymk.ranking.candidates import Candidate, CandidateConfig, CandidateFilter, CandidateSet, generate_candidates
from pymk.ranking.cascade import list_scores
from pymk.ranking.features import FEATURE_INDEX, FeatureBuilder, feature_dict
from pymk.ranking.reasons import ListEvidence, MutualDegrees, build_reasons
from pymk.ranking.source import RankingSource, Scorer

DEFAULT_K = 20
_DEGREE_COLUMN = FEATURE_INDEX["candidate_degree_log"]  # monotone in degree: ties of degree tie here too

# Shared by calls that pass no builder: its profile cache checks every hit against the source's current
# profile, so sharing it between sources is safe, and it keeps parsed profiles between calls.
_DEFAULT_BUILDER = FeatureBuilder()


@dataclass(frozen=True)
class RecommendRequest:
    user: int
    as_of_ms: int
    k: int = DEFAULT_K
    candidate_config: CandidateConfig = field(default_factory=CandidateConfig)


@dataclass(frozen=True)
class RankedItem:
    candidate: Candidate
    score: float
    rank: int  # 1-based
    sources: tuple[str, ...]
    reasons: dict[str, Any]

    def to_recommendation_item(self) -> RecommendationItem:
        return RecommendationItem(self.candidate.user, self.score, self.rank, self.sources, self.reasons)


@dataclass(frozen=True)
class RankedList:
    user: int
    items: tuple[RankedItem, ...]
    model_version: str
    generated_at: int  # the as-of time, epoch ms
    feature_matrix_of_items: np.ndarray  # (len(items), 17), row i is items[i]'s features (NaN: missing)
    timings: dict[str, float]  # milliseconds per stage: candidates, features, predict, reasons, total
    candidates_considered: int = 0

    def features_of(self, index: int) -> dict[str, float | None]:
        """Item ``index``'s features by name, JSON-ready (for impressions)."""
        return feature_dict(self.feature_matrix_of_items[index])

    def to_recommendations(self) -> Recommendations:
        return Recommendations(self.user, self.generated_at, self.model_version,
                               tuple(item.to_recommendation_item() for item in self.items))


@dataclass(frozen=True)
class ScoredCandidates:
    """Stage 1 and Stage 2 of one user before the reasons (also what training-data replays record)."""

    candidates: CandidateSet
    features: np.ndarray  # (n, 17)
    scores: np.ndarray  # (n,)
    top: np.ndarray  # indices of the top k in final order
    timings: dict[str, float]
    prefilter_margins: np.ndarray | None = None  # the cascade's pre-ranker margins of every row (ranking/cascade.py)


def ranking_order(scores: np.ndarray, degree_key: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    """Indices of the top k by (score desc, degree desc, id asc)."""
    n = len(scores)
    if n == 0 or k <= 0:
        return np.empty(0, np.int64)
    scores = np.asarray(scores, np.float64)
    if n > k:
        # Only rows scoring at least the k-th best score can be in the top k (ties included): sort just those.
        threshold = np.partition(scores, n - k)[n - k]
        pool = np.flatnonzero(scores >= threshold)
    else:
        pool = np.arange(n)
    order = np.lexsort((ids[pool], -degree_key[pool], -scores[pool]))
    return pool[order[:k]]


def sample_unshown(top: np.ndarray, scores: np.ndarray, k: int, near_ranks: int,
                   rng: np.random.Generator) -> list[tuple[int, float]]:
    """(candidate index, weight) of up to ``k`` candidates that were scored but not in ``top``, to log with a
    list: half from just below it (the unshown ones ranked above ``near_ranks`` by ``scores``), where a better
    model's promotions come from, half from the rest of the pool; each weighted by how many candidates of its
    stratum it stands for (stratum size / sample size, Horvitz-Thompson), so the weighted sample has the pool's
    mix. A stratum with fewer candidates than its half gives the rest to the other. In index order."""
    unshown = np.ones(len(scores), dtype=bool)
    unshown[np.asarray(top, dtype=np.int64)] = False
    by_score = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    rest = by_score[unshown[by_score]]
    if k <= 0 or not len(rest):
        return []
    near = rest[: max(0, near_ranks - (len(scores) - len(rest)))]
    far = rest[len(near):]
    near_quota = min(len(near), max((k + 1) // 2, k - len(far)))
    far_quota = min(len(far), k - near_quota)
    out: list[tuple[int, float]] = []
    for stratum, quota in ((near, near_quota), (far, far_quota)):
        if quota > 0:
            weight = len(stratum) / quota
            out.extend((int(stratum[j]), weight) for j in rng.choice(len(stratum), size=quota, replace=False))
    return sorted(out)


def score_candidates(user: int, source: RankingSource, scorer: Scorer, candidate_config: CandidateConfig,
                     as_of_ms: int, k: int = DEFAULT_K, filters: Iterable[CandidateFilter] | None = None,
                     builder: FeatureBuilder | None = None) -> ScoredCandidates:
    builder = builder or _DEFAULT_BUILDER
    started = time.perf_counter()
    candidates = generate_candidates(user, source, candidate_config, as_of_ms, filters)
    generated = time.perf_counter()
    features = builder.matrix(user, candidates, source, as_of_ms)
    built = time.perf_counter()
    scores, pre = list_scores(scorer, features, candidates.ids) if len(candidates) else (np.empty(0), None)
    predicted = time.perf_counter()
    top = ranking_order(scores, features[:, _DEGREE_COLUMN], candidates.ids, k)
    timings = {"candidates": (generated - started) * 1e3, "features": (built - generated) * 1e3,
               "predict": (predicted - built) * 1e3, "order": (time.perf_counter() - predicted) * 1e3}
    return ScoredCandidates(candidates, features, scores, top, timings, pre)


def rank_scored(user: int, scored: ScoredCandidates, source: RankingSource, scorer: Scorer, as_of_ms: int,
                builder: FeatureBuilder | None = None) -> RankedList:
    """The reasons and the response for already scored candidates."""
    builder = builder or _DEFAULT_BUILDER
    started = time.perf_counter()
    top = scored.top
    rows = scored.features[top]
    contributions = scorer.explain(rows) if len(top) else np.empty((0, rows.shape[1]))
    evidence = ListEvidence.of(rows, contributions)  # what sets each item apart in its list
    shown = scored.candidates.subset(top)
    ids, counts = shown.ids.tolist(), shown.common_neighbor_count.tolist()
    row_values = rows.tolist()  # the same floats; a list's item reads are cheaper than numpy scalars
    # the mutual examples of the whole list: the common neighbours' degrees in one batch read
    degree_of = MutualDegrees(source)
    mutual_column = FEATURE_INDEX["common_neighbor_count"]
    commons = {i: source.common_neighbors(user, ids[i]) for i, row in enumerate(row_values) if int(row[mutual_column])}
    degree_of.prefetch(z for common in commons.values() for z in common)
    items: list[RankedItem] = []
    for i, (candidate_id, sources, aa, ann, score, row, (relative, strongest, strength)) in enumerate(zip(
            ids, shown.sources_of(np.arange(len(ids))), shown.adamic_adar_score.tolist(), shown.ann_score.tolist(),
            scored.scores[top].tolist(), row_values, evidence.rows(), strict=True)):
        candidate = Candidate(candidate_id, sources, counts[i], aa, None if ann != ann else ann)  # NaN: not ANN's
        examples = degree_of.examples(commons[i]) if i in commons else []
        reasons = build_reasons(user, candidate_id, sources, candidate.ann_score, row, relative, source,
                                builder.profiles, degree_of, strongest, strength, examples)
        items.append(RankedItem(candidate, score, i + 1, sources, reasons))
    timings = dict(scored.timings)
    timings["reasons"] = (time.perf_counter() - started) * 1e3
    timings["total"] = sum(timings.values())
    return RankedList(user, tuple(items), scorer.version, as_of_ms, rows, timings, len(scored.candidates))


def recommend(user: int, source: RankingSource, scorer: Scorer, candidate_config: CandidateConfig, as_of_ms: int,
              k: int = DEFAULT_K, filters: Iterable[CandidateFilter] | None = None,
              builder: FeatureBuilder | None = None) -> RankedList:
    """The top ``k`` recommendations for ``user`` as of ``as_of_ms``, with reasons.

    ``filters``: the Stage 1 filters (default: self, connections, dismissed with the config's expiry,
    blocked). ``builder``: keep one per worker so its profile cache lives across calls.
    """
    if k < 1:
        raise ValueError("k must be at least 1")
    scored = score_candidates(user, source, scorer, candidate_config, as_of_ms, k, filters, builder)
    return rank_scored(user, scored, source, scorer, as_of_ms, builder)


def recommend_request(request: RecommendRequest, source: RankingSource, scorer: Scorer,
                      builder: FeatureBuilder | None = None) -> RankedList:
    return recommend(request.user, source, scorer, request.candidate_config, request.as_of_ms, request.k,
                     builder=builder)
