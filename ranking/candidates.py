"""Stage 1: hybrid candidate generation (2-hop graph ∪ ANN), filters, and the rough cut.

For a query user:

1. **Graph**: every distance-2 user from :meth:`RankingSource.two_hop`, minus the users the filters exclude,
   then the top ``graph_k`` by (common-neighbour count desc, Adamic-Adar desc, degree desc, id asc). Degrees
   are looked up only for the users tied with the last kept one on (count, AA), so a hub's 10⁵ two-hop
   users cost two partitions, not 10⁵ degree reads. AA is compared rounded to 1e-9, so two sums of the same
   terms in a different order (the worker's and ours) tie instead of splitting on the last bit.
2. **ANN**: :meth:`RankingSource.ann_neighbours` with ``ann_k`` and the excluded users passed as ``exclude``,
   so the index fills its k slots with users that can be shown.
3. **Merge**: union by id; a candidate remembers its sources (``graph``, ``ann``). An ANN-only candidate gets
   its count and AA from the 2-hop maps when it is at distance 2 but below the graph cut, else 0.
4. **Filters**, applied in sequence on the merged set (:class:`ExcludeSelf`, :class:`ExcludeConnections`,
   :class:`ExcludeDismissed`, :class:`ExcludeBlocked` by default; any object with ``excluded`` and ``keep``
   composes). Pruning the pools up front (steps 1–2) is an optimisation so that no excluded user takes a
   slot; this pass is the guarantee.
   **Popular** (:class:`~pymk.ranking.source.PopularSource`, when the source has it): the ``popular_k``
   most active users not excluded, source ``popular`` (a contract extension of ``sources``); an entry the
   other sources did not bring gets its count and AA from the 2-hop maps, no cosine.
5. **Rough cut** to ``max_candidates`` by ``rough score = AA + ann_weight × max(cosine, 0)`` (cosine 0 for
   graph-only candidates: their cosine is not known before Stage 2), ties by count desc then id asc. With the
   defaults (1,000 + 1,000 + 100 ≤ 2,100) the cut never drops anything; it bounds Stage 2 when the sizes are raised.
   ``ann_weight`` = 2 puts a cosine-0.5 stranger level with a pair sharing one mutual of degree ~e.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import filterfalse, islice
from typing import Protocol

import numpy as np

from pymk.ranking.id_index import ids_in
from pymk.ranking.source import PopularSource, RankingSource, TwoHopArraySource

GRAPH = "graph"
ANN = "ann"
POPULAR = "popular"
_AA_DECIMALS = 9  # AA is compared at this precision when ordering (see the module doc)


@dataclass(frozen=True)
class CandidateConfig:
    graph_k: int = 1000  # top 2-hop candidates kept
    ann_k: int = 1000  # ANN neighbours asked for (0 disables ANN)
    popular_k: int = 100  # most active users (PopularSource; 0 disables), for users whose 2-hop/ANN sets miss them
    max_candidates: int = 2100  # size of the Stage 2 input after the rough cut
    ann_weight: float = 2.0  # rough score = AA + ann_weight × max(cosine, 0)
    dismissal_expiry_ms: int | None = None  # a dismissal older than this no longer hides a candidate; None: never

    def __post_init__(self) -> None:
        if self.graph_k < 0 or self.ann_k < 0 or self.popular_k < 0 or self.max_candidates < 0:
            raise ValueError("candidate sizes must be non-negative")
        if self.dismissal_expiry_ms is not None and self.dismissal_expiry_ms < 0:
            raise ValueError("dismissal_expiry_ms must be non-negative or None")


@dataclass(frozen=True, slots=True)
class Candidate:
    user: int
    sources: tuple[str, ...]  # subset of ("graph", "ann", "popular"), in that order
    common_neighbor_count: int
    adamic_adar_score: float
    ann_score: float | None  # cosine from the ANN index; None when ANN did not return the user


@dataclass(frozen=True)
class CandidateSet:
    """The Stage 1 output for one query user as parallel arrays (Stage 2 works on arrays; :class:`Candidate`
    objects are made only for the items shown). Ordered by rough score."""

    user: int
    ids: np.ndarray  # int64
    common_neighbor_count: np.ndarray  # int64
    adamic_adar_score: np.ndarray  # float64
    ann_score: np.ndarray  # float64, NaN for users ANN did not return
    from_graph: np.ndarray  # bool: in the graph top-k
    from_ann: np.ndarray  # bool: returned by ANN
    stats: dict[str, int] = field(default_factory=dict)  # pool sizes, for logs and metrics
    from_popular: np.ndarray | None = None  # bool: among the most active users (None: nobody)
    # ids whose place at the graph cut their degrees decided (top_k_graph_and_ties), whether or not they got in
    graph_ties: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def sources(self, index: int) -> tuple[str, ...]:
        flags = (bool(self.from_graph[index]), bool(self.from_ann[index]),
                 self.from_popular is not None and bool(self.from_popular[index]))
        return tuple(name for name, flag in zip((GRAPH, ANN, POPULAR), flags, strict=True) if flag)

    def sources_of(self, indices: Sequence[int]) -> list[tuple[str, ...]]:
        """:meth:`sources` of many candidates at once (one array read per flag, not one per item)."""
        graph, ann = self.from_graph[indices].tolist(), self.from_ann[indices].tolist()
        popular = self.from_popular[indices].tolist() if self.from_popular is not None else [False] * len(graph)
        return [tuple(name for name, flag in ((GRAPH, g), (ANN, a), (POPULAR, p)) if flag)
                for g, a, p in zip(graph, ann, popular, strict=True)]

    def candidate(self, index: int) -> Candidate:
        ann = float(self.ann_score[index])
        return Candidate(int(self.ids[index]), self.sources(index), int(self.common_neighbor_count[index]),
                         float(self.adamic_adar_score[index]), None if np.isnan(ann) else ann)

    def candidates(self) -> list[Candidate]:
        return [self.candidate(i) for i in range(len(self))]

    def subset(self, mask_or_indices: np.ndarray) -> CandidateSet:
        return CandidateSet(self.user, self.ids[mask_or_indices], self.common_neighbor_count[mask_or_indices],
                            self.adamic_adar_score[mask_or_indices], self.ann_score[mask_or_indices],
                            self.from_graph[mask_or_indices], self.from_ann[mask_or_indices], dict(self.stats),
                            None if self.from_popular is None else self.from_popular[mask_or_indices],
                            self.graph_ties)

    @classmethod
    def from_candidates(cls, user: int, candidates: Sequence[Candidate]) -> CandidateSet:
        n = len(candidates)
        return cls(
            user,
            np.fromiter((c.user for c in candidates), np.int64, n),
            np.fromiter((c.common_neighbor_count for c in candidates), np.int64, n),
            np.fromiter((c.adamic_adar_score for c in candidates), np.float64, n),
            np.fromiter((np.nan if c.ann_score is None else c.ann_score for c in candidates), np.float64, n),
            np.fromiter((GRAPH in c.sources for c in candidates), np.bool_, n),
            np.fromiter((ANN in c.sources for c in candidates), np.bool_, n),
            from_popular=np.fromiter((POPULAR in c.sources for c in candidates), np.bool_, n),
        )


# ---- filters ---------------------------------------------------------------------------------------------------
class CandidateFilter(Protocol):
    def excluded(self, user: int, source: RankingSource, as_of_ms: int) -> Collection[int]:
        """Users known up front to be excluded (pruned from the pools so they take no slot)."""
        ...

    def keep(self, user: int, ids: np.ndarray, source: RankingSource, as_of_ms: int) -> np.ndarray:
        """Bool mask over ``ids``: True for candidates that pass."""
        ...


class ExclusionFilter:
    """A filter defined by a set of excluded users; subclasses give :meth:`excluded`."""

    def excluded(self, user: int, source: RankingSource, as_of_ms: int) -> Collection[int]:
        raise NotImplementedError

    def keep(self, user: int, ids: np.ndarray, source: RankingSource, as_of_ms: int) -> np.ndarray:
        excluded = self.excluded(user, source, as_of_ms)
        if not excluded:
            return np.ones(len(ids), dtype=bool)
        return ~ids_in(ids, np.fromiter(excluded, np.int64, len(excluded)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ExcludeSelf(ExclusionFilter):
    def excluded(self, user: int, source: RankingSource, as_of_ms: int) -> Collection[int]:
        return (user,)


class ExcludeConnections(ExclusionFilter):
    def excluded(self, user: int, source: RankingSource, as_of_ms: int) -> Collection[int]:
        return source.neighbours(user)


class ExcludeDismissed(ExclusionFilter):
    """Hides candidates the user dismissed; with ``expiry_ms``, a dismissal older than that (as of the ranking
    time) no longer hides the candidate."""

    def __init__(self, expiry_ms: int | None = None) -> None:
        self.expiry_ms = expiry_ms

    def excluded(self, user: int, source: RankingSource, as_of_ms: int) -> Collection[int]:
        dismissed = source.dismissed(user)
        if self.expiry_ms is None:
            return dismissed.keys()
        since = as_of_ms - self.expiry_ms
        return {candidate for candidate, ts in dismissed.items() if ts >= since}

    def __repr__(self) -> str:
        return f"ExcludeDismissed(expiry_ms={self.expiry_ms})"


class ExcludeBlocked(ExclusionFilter):
    def excluded(self, user: int, source: RankingSource, as_of_ms: int) -> Collection[int]:
        return source.blocked(user)


def default_filters(config: CandidateConfig) -> tuple[CandidateFilter, ...]:
    return (ExcludeSelf(), ExcludeConnections(), ExcludeDismissed(config.dismissal_expiry_ms), ExcludeBlocked())


# ---- stage 1 ---------------------------------------------------------------------------------------------------
def _top_k_graph(ids: np.ndarray, counts: np.ndarray, scores: np.ndarray, k: int,
                 source: RankingSource) -> np.ndarray:
    """Indices of the top k by (count desc, AA desc, degree desc, id asc), in no particular order (the merge
    orders candidates by rough score)."""
    return top_k_graph_and_ties(ids, counts, scores, k, source)[0]


def top_k_graph_and_ties(ids: np.ndarray, counts: np.ndarray, scores: np.ndarray, k: int,
                         source: RankingSource) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_top_k_graph`'s indices, and the ids of the users whose place at the cut their degrees decided (tied
    with the k-th on count and AA, more of them than slots left; empty when no degree decided): a kept list
    (ranking/incremental.py) must rebuild when one of their degrees moves."""
    n = len(ids)
    ties = np.empty(0, np.int64)
    if n > k:
        rounded = np.round(scores, _AA_DECIMALS)
        # Everything strictly better than the k-th (count, AA) is in; the rest of the k slots go to the users
        # tied with it, by degree then id. Two O(n) partitions find the boundary.
        count_at_k = np.partition(counts, n - k)[n - k]
        above = counts > count_at_k
        tied = np.flatnonzero(counts == count_at_k)
        need = k - int(above.sum())
        tied_scores = rounded[tied]
        score_at_k = np.partition(tied_scores, len(tied) - need)[len(tied) - need]
        better = tied[tied_scores > score_at_k]
        boundary = tied[tied_scores == score_at_k]
        need -= len(better)
        if need < len(boundary):
            ties = ids[boundary]
            degrees = np.fromiter((source.degree(int(u)) for u in ties), np.int64, len(boundary))
            boundary = boundary[np.lexsort((ties, -degrees))[:need]]
        return np.concatenate([np.flatnonzero(above), better, boundary]), ties
    return np.arange(n), ties


def two_hop_by_id(user: int, source: RankingSource) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids ascending, common-neighbour counts, Adamic-Adar) of every distance-2 user."""
    if isinstance(source, TwoHopArraySource):
        held = source.two_hop_arrays(user)
        return held.ids, held.counts, held.adamic_adar
    counts_map, scores_map = source.two_hop(user)
    pool = len(counts_map)
    ids = np.fromiter(counts_map.keys(), np.int64, pool)
    counts = np.fromiter(counts_map.values(), np.int64, pool)
    scores = np.fromiter(map(scores_map.__getitem__, counts_map), np.float64, pool)  # the ids' order
    order = np.argsort(ids)
    return ids[order], counts[order], scores[order]


def lookup_by_id(sorted_ids: np.ndarray, values: np.ndarray, ids: np.ndarray, missing: float) -> np.ndarray:
    """``values`` at ``ids`` (found in ``sorted_ids`` by binary search), ``missing`` where absent."""
    if not len(sorted_ids) or not len(ids):
        return np.full(len(ids), missing, values.dtype)
    position = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
    return np.where(sorted_ids[position] == ids, values[position], missing).astype(values.dtype)


def _first_occurrences(ids: np.ndarray) -> np.ndarray:
    """Indices of the first occurrence of each distinct id, in order."""
    if len(ids) < 2:
        return np.arange(len(ids))
    _, first = np.unique(ids, return_index=True)
    return np.sort(first)


def generate_candidates(user: int, source: RankingSource, config: CandidateConfig, as_of_ms: int,
                        filters: Iterable[CandidateFilter] | None = None) -> CandidateSet:
    """Stage 1 for ``user`` as of ``as_of_ms`` (see the module doc)."""
    filters = tuple(default_filters(config) if filters is None else filters)
    excluded: set[int] = set()
    # Filters whose keep() is "not excluded" (ExclusionFilter's) are applied below with one set of their union;
    # the others with their own keep().
    others: list[CandidateFilter] = []
    for candidate_filter in filters:
        excluded.update(candidate_filter.excluded(user, source, as_of_ms))
        if type(candidate_filter).keep is not ExclusionFilter.keep:
            others.append(candidate_filter)
    excluded_ids = np.fromiter(excluded, np.int64, len(excluded))

    # The whole 2-hop set by id (the order Stage 1 sees it in does not matter: the graph top k is a set, and the
    # final order is total).
    two_hop_ids, two_hop_counts, two_hop_scores = two_hop_by_id(user, source)
    pool = len(two_hop_ids)
    graph_ids = graph_ties = np.empty(0, np.int64)
    graph_counts = np.empty(0, np.int64)
    graph_scores = np.empty(0, np.float64)
    if config.graph_k > 0 and pool:
        allowed = ~ids_in(two_hop_ids, excluded_ids) if len(excluded_ids) else np.ones(pool, bool)
        ids, counts, scores = two_hop_ids[allowed], two_hop_counts[allowed], two_hop_scores[allowed]
        top, graph_ties = top_k_graph_and_ties(ids, counts, scores, config.graph_k, source)
        graph_ids, graph_counts, graph_scores = ids[top], counts[top], scores[top]

    ann = list(source.ann_neighbours(user, config.ann_k, excluded)) if config.ann_k > 0 else []
    ann = ann[: config.ann_k]
    popular: list[int] = []
    if config.popular_k > 0 and isinstance(source, PopularSource):
        asked = source.most_active(config.popular_k + len(excluded), as_of_ms)
        # the first popular_k not excluded: the walk stops there (asked holds popular_k + every excluded user)
        popular = list(islice(filterfalse(excluded.__contains__, map(int, asked)), config.popular_k))

    # Merge: graph candidates first (their order), then ANN-only ones (first hit of each, in ANN order), then
    # popular ones the others did not bring. A graph candidate takes the cosine of its first ANN hit with one.
    ann_ids = np.array([u for u, _ in ann], np.int64)
    ann_cosines = np.array([c for _, c in ann], np.float64)
    graph_cos = np.full(len(graph_ids), np.nan)
    in_graph = ids_in(ann_ids, graph_ids)
    hits = np.flatnonzero(in_graph & ~np.isnan(ann_cosines))
    if len(hits):
        hits = hits[_first_occurrences(ann_ids[hits])]
        by_id = np.argsort(graph_ids)
        graph_cos[by_id[np.searchsorted(graph_ids, ann_ids[hits], sorter=by_id)]] = ann_cosines[hits]
    ann_only = np.flatnonzero(~in_graph)
    ann_only = ann_only[_first_occurrences(ann_ids[ann_only])]
    n_ann_only = len(ann_only)
    popular_ids = np.array(popular, np.int64)
    popular_new = popular_ids[~ids_in(popular_ids, np.concatenate([graph_ids, ann_ids]))]
    popular_new = popular_new[_first_occurrences(popular_new)]
    extra_ids = np.concatenate([ann_ids[ann_only], popular_new])
    n_graph = len(graph_ids)
    ids = np.concatenate([graph_ids, extra_ids])
    counts = np.concatenate([graph_counts, lookup_by_id(two_hop_ids, two_hop_counts, extra_ids, 0)])
    scores = np.concatenate([graph_scores, lookup_by_id(two_hop_ids, two_hop_scores, extra_ids, 0.0)])
    ann_scores = np.concatenate([graph_cos, ann_cosines[ann_only], np.full(len(popular_new), np.nan)])
    from_graph = np.concatenate([np.ones(n_graph, bool), np.zeros(len(extra_ids), bool)])
    from_ann = ~np.isnan(ann_scores)
    from_popular = ids_in(ids, popular_ids)
    candidates = CandidateSet(user, ids, counts, scores, ann_scores, from_graph, from_ann,
                              {"two_hop": pool, "graph": n_graph, "ann": len(ann), "popular": len(popular),
                               "merged": len(ids), "ann_only": n_ann_only}, from_popular, graph_ties)

    if not others:  # each ExclusionFilter's keep() would be "not in its excluded()": all at once
        keep = ~ids_in(candidates.ids, excluded_ids) if len(excluded_ids) else np.ones(len(candidates), bool)
        if not keep.all():
            candidates = candidates.subset(keep)
    else:
        for candidate_filter in filters:
            keep = candidate_filter.keep(user, candidates.ids, source, as_of_ms)
            if not keep.all():
                candidates = candidates.subset(keep)

    rough = candidates.adamic_adar_score + config.ann_weight * np.nan_to_num(
        np.maximum(candidates.ann_score, 0.0), nan=0.0)
    order = np.lexsort((candidates.ids, -candidates.common_neighbor_count, -np.round(rough, _AA_DECIMALS)))
    candidates = candidates.subset(order[: config.max_candidates])
    candidates.stats["filtered"] = len(ids) - len(order)
    candidates.stats["candidates"] = len(candidates)
    return candidates
