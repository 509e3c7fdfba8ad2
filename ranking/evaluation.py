"""The evaluation protocol of ``pymk evaluate``: splits, reference heuristics, metrics.

Pure code (numpy only, no Kafka): the lead's product methods (hybrid candidates + XGBoost, GraphSAGE-ANN, the
live pipeline replay) plug in through the :class:`Method` protocol and are scored by exactly the same code as
the heuristic reference rows, which must reproduce ``REFERENCE_RECALL_AT_20``.

The protocol is fixed by the contract (``PROTOCOL_TEXT`` below). Users are mapped to dense indices in
ascending id order, so "lower id" and "lower index" are the same tie-break.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import numpy as np

from pymk.datasets import EdgeHistory, load_edge_history
from pymk.learning import LeakageError

SplitKind = Literal["time", "random"]
# A candidate generator under evaluation: user id -> the users it would hand to the ranker.
CandidateSet = Callable[[int], Collection[int]]

PAST_FRACTION = 0.8
DEFAULT_KS: tuple[int, ...] = (20, 50)
# Issue #6's quality goal: the product's relative Recall@20 lift over the best single heuristic of the graph.
QUALITY_GOAL: dict[str, float] = {"time": 0.15, "random": 0.05}
HEURISTIC_METHODS = ("CN", "AA", "RA", "popularity")
PRODUCT_METHODS = ("hybrid+XGBoost", "hybrid+XGBoost (live)")
CURVE_MAX_K = 100

# Scores are rounded before ordering so that sums of the same terms added in a different order (Adamic-Adar,
# resource allocation) tie exactly, and the tie rule (higher degree, then lower id) decides, not float noise.
SCORE_DECIMALS = 10

PROTOCOL_TEXT = """\
Evaluation protocol (pymk evaluate):
1. A connection is the first interaction of an unordered pair; self-loops are dropped; later interactions of
   the same pair are behavioural signal (profile views), not new connections.
2. --split time: connections sorted by time (ties by the pair's smaller id, then larger id), the first
   floor(0.8*n) are the past, the rest the future.
   --split random: a seeded random 80/20 split of the edges (for graphs without timestamps): Python
   random.Random(seed).shuffle (seed 0) of the time-ordered unique edges, the first floor(0.8*n) are the past.
3. Query users: past-graph users with at least one future connection to another past-graph user. Future pairs
   with an endpoint unseen in the past are cold-start cases: counted apart, they don't enter Recall.
4. Candidates for a query user: every past-graph user that is not the user and not a past neighbour.
5. Recall@K = |top-K ∩ future neighbours| / |future neighbours|, averaged over query users (K = 20, 50), where
   the future neighbours of a query user are its future connections to past-graph users. MRR: reciprocal rank
   of the best-ranked future neighbour in the method's full ranking (0 if none is ranked), averaged over query
   users. Coverage of a candidate set: the fraction of (query user, future neighbour) pairs inside the set
   (graph = 2-hop of the past graph, ANN-only, hybrid).
6. Ties break by higher degree (past degree), then lower id. CN/AA/RA candidates with score 0 are still
   candidates, ordered after the positive-score ones by the tie rule (so popularity fills the list).
AA = sum over common neighbours z of 1/ln(deg z) (a neighbour of degree 1 contributes 0);
RA = sum of 1/deg z; popularity ranks by past degree.
"""

# Recall@20 computed independently of the project (the contract's table); keyed by data file name (without .gz).
REFERENCE_RECALL_AT_20: dict[str, dict[str, object]] = {
    "CollegeMsg.txt": {"split": "time", "CN": 0.0420, "AA": 0.0484, "RA": 0.0536, "popularity": 0.0710},
    "digg_reply.txt": {"split": "time", "CN": 0.0118, "AA": 0.0067, "RA": 0.0056, "popularity": 0.0216},
    "facebook_combined.txt": {"split": "random", "CN": 0.6289, "AA": 0.6530, "RA": 0.6677, "popularity": 0.0618},
    "CA-HepPh.txt": {"split": "random", "CN": 0.7312, "AA": 0.7853, "RA": 0.7911, "popularity": 0.0225},
}
REFERENCE_TOLERANCE = 0.005


# --------------------------------------------------------------------------------------------- the split


@dataclass(frozen=True, eq=False)
class PastGraphArrays:
    """The past graph as CSR arrays over dense indices (index order = ascending user id), for fast traversal."""

    user_ids: np.ndarray  # int64, sorted; index -> user id
    index_of: dict[int, int]  # user id -> index
    indptr: np.ndarray  # int64, len n + 1
    neighbours: np.ndarray  # int64 indices, each row sorted
    degree: np.ndarray  # int64 past degree per index
    popularity_order: np.ndarray  # indices sorted by (higher degree, lower id)
    popularity_position: np.ndarray  # index -> position in popularity_order

    @property
    def size(self) -> int:
        return len(self.user_ids)

    def row(self, index: int) -> np.ndarray:
        return self.neighbours[self.indptr[index] : self.indptr[index + 1]]


@dataclass(frozen=True, eq=False)
class EvaluationSplit:
    """Past/future partition of a history and everything the metrics need, derived once."""

    kind: SplitKind
    seed: int
    data_path: str
    past_connections: list[tuple[int, int, int]]  # (u, v, ts_ms), u < v, in protocol time order
    future_connections: list[tuple[int, int, int]]  # (u, v, ts_ms), u < v, in protocol time order
    past_adjacency: dict[int, frozenset[int]]  # the only graph a method may see
    past_degree: dict[int, int]
    query_users: list[int]  # ascending id
    future_neighbours: dict[int, frozenset[int]]  # query user -> future connections to past-graph users
    cold_start_pairs: int  # future pairs with at least one endpoint unseen in the past
    cold_start_pairs_both_new: int  # ... of which both endpoints are unseen
    arrays: PastGraphArrays = field(repr=False)

    @property
    def future_pairs(self) -> list[tuple[int, int]]:
        return [(u, v) for u, v, _ in self.future_connections]

    @property
    def past_users(self) -> Collection[int]:
        return self.past_adjacency.keys()

    @property
    def evaluated_pairs(self) -> int:
        """(query user, future neighbour) pairs: each warm future connection counts once per endpoint."""
        return sum(len(targets) for targets in self.future_neighbours.values())

    def sizes(self) -> dict[str, int]:
        return {
            "connections": len(self.past_connections) + len(self.future_connections),
            "past_connections": len(self.past_connections),
            "future_connections": len(self.future_connections),
            "past_users": len(self.past_adjacency),
            "future_pairs_between_past_users": len(self.future_connections) - self.cold_start_pairs,
            "cold_start_pairs": self.cold_start_pairs,
            "cold_start_pairs_both_new": self.cold_start_pairs_both_new,
            "query_users": len(self.query_users),
            "evaluated_user_pairs": self.evaluated_pairs,
        }


def split_connections(
    connections: Sequence[tuple[int, int, int]], kind: SplitKind, seed: int = 0
) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
    """(past, future) connections, each in protocol time order, as the protocol's step 2 defines them."""
    ordered = sorted(((min(u, v), max(u, v), ts) for u, v, ts in connections), key=lambda c: (c[2], c[0], c[1]))
    cut = math.floor(PAST_FRACTION * len(ordered))
    if kind == "time":
        return ordered[:cut], ordered[cut:]
    if kind == "random":
        # Shuffle the list of (u, v) in load order, exactly as the reference did; only positions matter.
        edges = [(u, v) for u, v, _ in connections]
        random.Random(seed).shuffle(edges)
        past_pairs = {(min(u, v), max(u, v)) for u, v in edges[:cut]}
        past = [c for c in ordered if (c[0], c[1]) in past_pairs]
        future = [c for c in ordered if (c[0], c[1]) not in past_pairs]
        return past, future
    raise ValueError(f"unknown split kind {kind!r} (expected 'time' or 'random')")


def build_past_graph_arrays(adjacency: Mapping[int, Collection[int]]) -> PastGraphArrays:
    user_ids = np.array(sorted(adjacency), dtype=np.int64)
    index_of = {int(user): index for index, user in enumerate(user_ids)}
    degree = np.array([len(adjacency[int(user)]) for user in user_ids], dtype=np.int64)
    indptr = np.zeros(len(user_ids) + 1, dtype=np.int64)
    np.cumsum(degree, out=indptr[1:])
    neighbours = np.empty(int(indptr[-1]), dtype=np.int64)
    for index, user in enumerate(user_ids):
        row = sorted(index_of[other] for other in adjacency[int(user)])
        neighbours[indptr[index] : indptr[index + 1]] = row
    # lexsort: the last key is primary -> higher degree first, then lower index (= lower id)
    popularity_order = np.lexsort((np.arange(len(user_ids)), -degree)).astype(np.int64)
    popularity_position = np.empty_like(popularity_order)
    popularity_position[popularity_order] = np.arange(len(popularity_order))
    return PastGraphArrays(user_ids, index_of, indptr, neighbours, degree, popularity_order, popularity_position)


def make_split(history: EdgeHistory, kind: SplitKind, seed: int = 0) -> EvaluationSplit:
    """Split a loaded history (``pymk.datasets.load_edge_history``) by the protocol and check it for leakage."""
    past, future = split_connections(history.connections, kind, seed)
    adjacency_sets: dict[int, set[int]] = {}
    for u, v, _ in past:
        adjacency_sets.setdefault(u, set()).add(v)
        adjacency_sets.setdefault(v, set()).add(u)
    past_adjacency = {user: frozenset(others) for user, others in adjacency_sets.items()}
    future_sets: dict[int, set[int]] = {}
    cold_start = cold_start_both_new = 0
    for u, v, _ in future:
        u_seen, v_seen = u in past_adjacency, v in past_adjacency
        if u_seen and v_seen:
            future_sets.setdefault(u, set()).add(v)
            future_sets.setdefault(v, set()).add(u)
        else:
            cold_start += 1
            cold_start_both_new += not (u_seen or v_seen)
    split = EvaluationSplit(
        kind=kind,
        seed=seed,
        data_path=history.path,
        past_connections=past,
        future_connections=future,
        past_adjacency=past_adjacency,
        past_degree={user: len(others) for user, others in past_adjacency.items()},
        query_users=sorted(future_sets),
        future_neighbours={user: frozenset(future_sets[user]) for user in sorted(future_sets)},
        cold_start_pairs=cold_start,
        cold_start_pairs_both_new=cold_start_both_new,
        arrays=build_past_graph_arrays(past_adjacency),
    )
    assert_no_leakage(split)
    return split


def assert_no_leakage(split: EvaluationSplit) -> None:
    """Raise :class:`LeakageError` if anything a method sees (the past graph) carries future information."""
    past_pairs = {(u, v) for u, v, _ in split.past_connections}
    for u, v, _ in split.future_connections:
        if (u, v) in past_pairs or v in split.past_adjacency.get(u, ()):
            raise LeakageError(f"future pair ({u}, {v}) is in the past graph")
    graph_pairs = {(min(u, v), max(u, v)) for u, others in split.past_adjacency.items() for v in others}
    if graph_pairs != past_pairs:
        extra = sorted(graph_pairs - past_pairs)[:5]
        raise LeakageError(f"the past graph is not exactly the past connections (e.g. extra pairs {extra})")
    for user, degree in split.past_degree.items():
        if degree != len(split.past_adjacency.get(user, ())):
            raise LeakageError(f"past degree of {user} ({degree}) is not its past-graph degree")
    if split.arrays.size != len(split.past_adjacency) or int(split.arrays.degree.sum()) != 2 * len(past_pairs):
        raise LeakageError("the traversal arrays are not the past graph")
    for user, targets in split.future_neighbours.items():
        if user not in split.past_adjacency or not targets <= split.past_adjacency.keys():
            raise LeakageError(f"query user {user} or one of its future neighbours is not a past-graph user")
        if targets & split.past_adjacency[user]:
            raise LeakageError(f"a future neighbour of {user} is already its past neighbour")
    if split.kind == "time" and split.past_connections and split.future_connections:
        last_past = max(ts for _, _, ts in split.past_connections)
        first_future = min(ts for _, _, ts in split.future_connections)
        if last_past > first_future:
            raise LeakageError(f"time split: a past connection (ts {last_past}) is later than a future one "
                               f"(ts {first_future})")


# ------------------------------------------------------------------------------------------------ methods


@runtime_checkable
class Method(Protocol):
    """A recommender under evaluation.

    ``rank(user, k)``: the top-k candidate ids, best first, already excluding the user and its past neighbours.
    Optional extras, used when present:
    ``candidates(user) -> Collection[int]``: the method's candidate set, for coverage;
    ``best_rank(user, targets) -> int | None``: 1-based position of the best-ranked target in the method's full
    ranking (None if none is ranked), so MRR needs no materialised full ranking.
    """

    name: str

    def rank(self, user: int, k: int) -> list[int]: ...


class NeighbourhoodHeuristic:
    """Score 2-hop candidates by a weighted common-neighbour sum; zero-score candidates follow by popularity.

    Per user: one 2-hop traversal over CSR arrays (a bincount), a sort of the positive-score candidates by
    (score desc, degree desc, id asc), then the popularity order with the excluded users skipped.
    """

    name = "neighbourhood"

    def __init__(self, split: EvaluationSplit, hub_degree: int = 0) -> None:
        self.split = split
        self.arrays = split.arrays
        self.weights = self.neighbour_weights(self.arrays.degree)
        if hub_degree and self.weights is not None:  # the worker's PYMK_HUB_DEGREE: no 2-path through a hub
            self.weights = np.where(self.arrays.degree > hub_degree, 0.0, self.weights)
        self._cached_user: int | None = None
        self._cached: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def neighbour_weights(self, degree: np.ndarray) -> np.ndarray | None:
        """Contribution of a common neighbour of each degree; None for no neighbourhood score (popularity)."""
        return np.ones(len(degree))

    def _scored(self, user: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ranked positive-score candidate indices, their scores, excluded indices = user ∪ past neighbours)."""
        if self._cached_user == user and self._cached is not None:
            return self._cached
        arrays = self.arrays
        index = arrays.index_of[user]
        own_neighbours = arrays.row(index)
        excluded = np.append(own_neighbours, index)
        if self.weights is None or len(own_neighbours) == 0:
            ranked = np.empty(0, dtype=np.int64)
            scores = np.empty(0)
        else:
            starts = arrays.indptr[own_neighbours]
            lengths = arrays.indptr[own_neighbours + 1] - starts
            # flat positions of every neighbour's neighbour list, without a Python loop
            offsets = np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(int(lengths.sum()))
            two_hop = arrays.neighbours[offsets]
            contributions = np.repeat(self.weights[own_neighbours], lengths)
            totals = np.bincount(two_hop, weights=contributions, minlength=arrays.size)
            totals[excluded] = 0.0
            totals = np.round(totals, SCORE_DECIMALS)
            positive = np.flatnonzero(totals > 0)
            scores = totals[positive]
            order = np.lexsort((positive, -arrays.degree[positive], -scores))
            ranked, scores = positive[order], scores[order]
        self._cached_user, self._cached = user, (ranked, scores, excluded)
        return self._cached

    def rank(self, user: int, k: int) -> list[int]:
        ranked, _, excluded = self._scored(user)
        arrays = self.arrays
        top = ranked[:k]
        missing = k - len(top)
        if missing > 0:
            # Walk just far enough down the popularity order: at most |skipped| entries are rejected.
            skipped = np.concatenate([excluded, ranked])
            window = arrays.popularity_order[: missing + len(skipped)]
            fill = window[~np.isin(window, skipped)][:missing]
            top = np.concatenate([top, fill])
        return [int(arrays.user_ids[i]) for i in top]

    def scores(self, user: int) -> dict[int, float]:
        """Positive scores of the user's candidates (rounded as ranked), e.g. for reasons or debugging."""
        ranked, scores, _ = self._scored(user)
        return {int(self.arrays.user_ids[i]): float(score) for i, score in zip(ranked, scores, strict=True)}

    def best_rank(self, user: int, targets: Iterable[int]) -> int | None:
        ranked, _, excluded = self._scored(user)
        arrays = self.arrays
        target_indices = np.array([arrays.index_of[t] for t in targets if t in arrays.index_of], dtype=np.int64)
        target_indices = target_indices[~np.isin(target_indices, excluded)]
        if len(target_indices) == 0:
            return None
        in_ranked = np.flatnonzero(np.isin(ranked, target_indices))
        if len(in_ranked):
            return int(in_ranked[0]) + 1
        # Every target has score 0: its place is after all positives, in popularity order among the rest.
        skipped_positions = np.sort(arrays.popularity_position[np.concatenate([excluded, ranked])])
        target_positions = arrays.popularity_position[target_indices]
        before = target_positions - np.searchsorted(skipped_positions, target_positions)
        return len(ranked) + int(before.min()) + 1


class TwoHopHeuristic(NeighbourhoodHeuristic):
    """A neighbourhood score: its candidate set (positive score) is the 2-hop set of the past graph."""

    def candidates(self, user: int) -> set[int]:
        ranked, _, _ = self._scored(user)
        return {int(self.arrays.user_ids[i]) for i in ranked}


class CommonNeighbours(TwoHopHeuristic):
    name = "CN"


class AdamicAdar(TwoHopHeuristic):
    name = "AA"

    def neighbour_weights(self, degree: np.ndarray) -> np.ndarray:
        weights = np.zeros(len(degree))
        above_one = degree > 1  # a degree-1 neighbour is nobody's *common* neighbour; 1/ln(1) is undefined
        weights[above_one] = 1.0 / np.log(degree[above_one])
        return weights


class ResourceAllocation(TwoHopHeuristic):
    name = "RA"

    def neighbour_weights(self, degree: np.ndarray) -> np.ndarray:
        return 1.0 / np.maximum(degree, 1)


class Popularity(NeighbourhoodHeuristic):
    name = "popularity"

    def neighbour_weights(self, degree: np.ndarray) -> None:
        return None


def reference_methods(split: EvaluationSplit, hub_degree: int = 0) -> list[NeighbourhoodHeuristic]:
    """The heuristics the product is judged against; with ``hub_degree`` (PYMK_HUB_DEGREE) no 2-path through a
    user of more past connections counts, as in the product's sources under the same cap."""
    return [CommonNeighbours(split, hub_degree), AdamicAdar(split, hub_degree), ResourceAllocation(split, hub_degree),
            Popularity(split)]


def two_hop_candidates(split: EvaluationSplit) -> Callable[[int], set[int]]:
    """The graph-only candidate set: users two hops away in the past graph, minus the user and its neighbours."""
    adjacency = split.past_adjacency

    def two_hop(user: int) -> set[int]:
        neighbours = adjacency.get(user, frozenset())
        reached: set[int] = set()
        for neighbour in neighbours:
            reached |= adjacency[neighbour]
        reached -= neighbours
        reached.discard(user)
        return reached

    return two_hop


# ------------------------------------------------------------------------------------------------ metrics


@dataclass(frozen=True)
class MethodScores:
    name: str
    recall: dict[int, float]  # K -> mean Recall@K over query users
    mrr: float
    query_users: int
    recall_curve: list[float]  # Recall@K for K = 1..len(recall_curve)
    seconds: float
    coverage: float | None = None  # of the method's own candidate set, when it exposes one

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "recall": {str(k): value for k, value in self.recall.items()},
            "mrr": self.mrr,
            "query_users": self.query_users,
            "recall_curve": self.recall_curve,
            "seconds": self.seconds,
            "coverage": self.coverage,
        }


@dataclass(frozen=True)
class EvaluationResult:
    data_path: str
    split_kind: SplitKind
    seed: int
    sizes: dict[str, int]
    methods: list[MethodScores]
    coverage: dict[str, float]  # candidate-set name -> fraction of (query user, future neighbour) pairs
    timings: dict[str, float]  # seconds: load, split, per method, coverage
    ks: tuple[int, ...] = DEFAULT_KS
    protocol: str = PROTOCOL_TEXT

    def method(self, name: str) -> MethodScores:
        for scores in self.methods:
            if scores.name == name:
                return scores
        raise KeyError(name)

    def reference(self) -> dict[str, dict[str, float | bool]]:
        """Reference Recall@20 with the measured value and delta, for the methods the table knows."""
        known = REFERENCE_RECALL_AT_20.get(Path(self.data_path).name.removesuffix(".gz"))
        if known is None or known["split"] != self.split_kind:
            return {}
        rows: dict[str, dict[str, float | bool]] = {}
        for scores in self.methods:
            if scores.name in known and 20 in scores.recall:
                expected = float(known[scores.name])  # type: ignore[arg-type]
                measured = scores.recall[20]
                rows[scores.name] = {"reference": expected, "measured": measured, "delta": measured - expected,
                                     "within_tolerance": abs(measured - expected) <= REFERENCE_TOLERANCE}
        return rows

    def quality_goal(self) -> dict[str, object] | None:
        """Issue #6's goal: the product's Recall@20 over the best single heuristic of this graph, relative, at
        least ``QUALITY_GOAL[split]``; with the share of future pairs outside every candidate set, which bounds
        what any Stage 2 can reach. None when the product or the heuristics are not among the methods."""
        heuristics = [m for m in self.methods if m.name in HEURISTIC_METHODS and 20 in m.recall]
        products = [m for m in self.methods if m.name in PRODUCT_METHODS and 20 in m.recall]
        if not heuristics or not products:
            return None
        best = max(heuristics, key=lambda m: m.recall[20])
        goal = QUALITY_GOAL[self.split_kind]
        rows = {}
        for product in products:
            lift = product.recall[20] / best.recall[20] - 1.0 if best.recall[20] > 0 else math.inf
            rows[product.name] = {"recall_at_20": product.recall[20], "relative_lift": lift, "met": lift >= goal}
        return {"goal_relative_lift": goal, "best_heuristic": best.name, "best_heuristic_recall_at_20":
                best.recall[20], "products": rows, "future_pairs_outside_hybrid_candidates":
                1.0 - self.coverage["hybrid"] if "hybrid" in self.coverage else None}

    def as_dict(self) -> dict[str, object]:
        return {
            "data_path": self.data_path,
            "split": self.split_kind,
            "seed": self.seed,
            "ks": list(self.ks),
            "sizes": self.sizes,
            "methods": [scores.as_dict() for scores in self.methods],
            "coverage": self.coverage,
            "timings_seconds": self.timings,
            "reference_recall_at_20": self.reference(),
            "reference_tolerance": REFERENCE_TOLERANCE,
            "quality_goal": self.quality_goal(),
            "protocol": self.protocol,
        }


def coverage(split: EvaluationSplit, candidate_sets: Mapping[str, CandidateSet]) -> dict[str, float]:
    """Per candidate set: the fraction of (query user, future neighbour) pairs whose neighbour is in the set."""
    total = split.evaluated_pairs
    fractions: dict[str, float] = {}
    for name, candidates_of in candidate_sets.items():
        covered = 0
        for user, targets in split.future_neighbours.items():
            candidates = candidates_of(user)
            covered += sum(1 for target in targets if target in candidates)
        fractions[name] = covered / total if total else 0.0
    return fractions


def score_method(
    split: EvaluationSplit,
    method: Method,
    ks: Sequence[int] = DEFAULT_KS,
    curve_max_k: int = CURVE_MAX_K,
    mrr_depth: int | None = None,
) -> MethodScores:
    """Recall@K, the Recall@K curve and MRR of one method over the split's query users.

    ``mrr_depth=None`` means the full ranking: ``best_rank`` when the method has it, else ``rank`` of every
    past-graph user. A method that ranks fewer users gets reciprocal rank 0 for users it misses.
    """
    started = time.perf_counter()
    depth = max(max(ks, default=0), curve_max_k)
    full_depth = mrr_depth if mrr_depth is not None else split.arrays.size
    best_rank = getattr(method, "best_rank", None) if mrr_depth is None else None
    hits_at = np.zeros(depth)  # summed per-user recall at each K
    reciprocal_ranks = 0.0
    for user in split.query_users:
        targets = split.future_neighbours[user]
        ranked = method.rank(user, depth)
        cumulative = np.cumsum([candidate in targets for candidate in ranked[:depth]], dtype=np.int64)
        padded = np.full(depth, cumulative[-1] if len(cumulative) else 0, dtype=float)
        padded[: len(cumulative)] = cumulative
        hits_at += padded / len(targets)
        first = next((position for position, candidate in enumerate(ranked, start=1) if candidate in targets), None)
        if first is None:
            if best_rank is not None:
                first = best_rank(user, targets)
            elif full_depth > depth:
                ranked_deep = method.rank(user, full_depth)
                first = next((pos for pos, candidate in enumerate(ranked_deep, start=1) if candidate in targets), None)
        if first is not None and first <= full_depth:
            reciprocal_ranks += 1.0 / first
    users = len(split.query_users)
    curve = (hits_at / users).tolist() if users else [0.0] * depth
    recall = {k: curve[k - 1] if users else 0.0 for k in ks}
    own_candidates = getattr(method, "candidates", None)
    own_coverage = coverage(split, {method.name: own_candidates})[method.name] if callable(own_candidates) else None
    return MethodScores(
        name=method.name,
        recall=recall,
        mrr=reciprocal_ranks / users if users else 0.0,
        query_users=users,
        recall_curve=curve[:curve_max_k],
        seconds=time.perf_counter() - started,
        coverage=own_coverage,
    )


def evaluate_methods(
    split: EvaluationSplit,
    methods: Sequence[Method],
    ks: Sequence[int] = DEFAULT_KS,
    mrr_depth: int | None = None,
    candidate_sets: Mapping[str, CandidateSet] | None = None,
    curve_max_k: int = CURVE_MAX_K,
    timings: Mapping[str, float] | None = None,
) -> EvaluationResult:
    """Score every method on the split; coverage of "graph" (2-hop) plus any extra candidate sets given."""
    all_timings = dict(timings or {})
    scored = []
    for method in methods:
        scores = score_method(split, method, ks, curve_max_k, mrr_depth)
        all_timings[f"method:{method.name}"] = scores.seconds
        scored.append(scores)
    started = time.perf_counter()
    covered = coverage(split, {"graph": two_hop_candidates(split), **(candidate_sets or {})})
    all_timings["coverage"] = time.perf_counter() - started
    return EvaluationResult(
        data_path=split.data_path,
        split_kind=split.kind,
        seed=split.seed,
        sizes=split.sizes(),
        methods=scored,
        coverage=covered,
        timings=all_timings,
        ks=tuple(ks),
    )


def evaluate_path(
    path: str | Path,
    kind: SplitKind,
    seed: int = 0,
    extra_methods: Callable[[EvaluationSplit], Sequence[Method]] | None = None,
    extra_candidate_sets: Callable[[EvaluationSplit], Mapping[str, CandidateSet]] | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    mrr_depth: int | None = None,
) -> EvaluationResult:
    """Load, split, and score the reference heuristics plus the product's methods (built from the split)."""
    started = time.perf_counter()
    history = load_edge_history(path)
    loaded = time.perf_counter()
    split = make_split(history, kind, seed)
    split_done = time.perf_counter()
    methods: list[Method] = [*reference_methods(split), *(extra_methods(split) if extra_methods else [])]
    candidate_sets = extra_candidate_sets(split) if extra_candidate_sets else None
    result = evaluate_methods(split, methods, ks=ks, mrr_depth=mrr_depth, candidate_sets=candidate_sets,
                              timings={"load": loaded - started, "split": split_done - loaded})
    result.timings["total"] = time.perf_counter() - started
    return result


# ------------------------------------------------------------------------------------------------ reports


def markdown_summary(result: EvaluationResult) -> str:
    """Method × Recall@K, MRR, own-candidate coverage (and the reference Recall@20 where the table knows it)."""
    reference = result.reference()
    k_headers = " | ".join(f"Recall@{k}" for k in result.ks)
    lines = [
        f"# pymk evaluate: {Path(result.data_path).name} ({result.split_kind} split, seed {result.seed})",
        "",
        f"| method | {k_headers} | MRR | coverage | query users | reference Recall@20 | delta | seconds |",
        "|---|" + "---|" * (len(result.ks) + 6),
    ]
    for scores in result.methods:
        recalls = " | ".join(f"{scores.recall[k]:.4f}" for k in result.ks)
        own_coverage = "" if scores.coverage is None else f"{scores.coverage:.4f}"
        row = reference.get(scores.name)
        expected = "" if row is None else f"{row['reference']:.4f}"
        delta = "" if row is None else f"{row['delta']:+.4f}"
        lines.append(f"| {scores.name} | {recalls} | {scores.mrr:.4f} | {own_coverage} | {scores.query_users} "
                     f"| {expected} | {delta} | {scores.seconds:.2f} |")
    goal = result.quality_goal()
    if goal is not None:
        lines += [""]
        for name, row in goal["products"].items():  # type: ignore[attr-defined]
            verdict = "met" if row["met"] else "**missed**"
            lines.append(f"Quality goal ({goal['goal_relative_lift']:.0%} over the best heuristic, "
                         f"{goal['best_heuristic']} {goal['best_heuristic_recall_at_20']:.4f}): {name} "
                         f"{row['recall_at_20']:.4f}, {row['relative_lift']:+.1%}: {verdict}.")
        if goal["future_pairs_outside_hybrid_candidates"] is not None:
            lines.append(f"{goal['future_pairs_outside_hybrid_candidates']:.1%} of the future pairs are outside "
                         "every candidate set (no ranker can reach them).")
    lines += ["", "Coverage of (query user, future neighbour) pairs by candidate set:", "",
              "| candidate set | coverage |", "|---|---|"]
    lines += [f"| {name} | {fraction:.4f} |" for name, fraction in result.coverage.items()]
    lines += ["", "| size | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in result.sizes.items()]
    lines += ["", "```", result.protocol.rstrip(), "```", ""]
    return "\n".join(lines)


def plot_recall_curves(result: EvaluationResult, out_png: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on workers or CI
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for scores in result.methods:
        k_values = range(1, len(scores.recall_curve) + 1)
        axes.plot(k_values, scores.recall_curve, label=scores.name)
    for k in result.ks:
        axes.axvline(k, color="grey", linewidth=0.6, linestyle=":")
    axes.set_xlabel("K")
    axes.set_ylabel("Recall@K")
    axes.set_title(f"{Path(result.data_path).name}: {result.split_kind} split, "
                   f"{result.sizes.get('query_users', 0)} query users")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(out_png, dpi=120)
    plt.close(figure)


def write_report(
    result: EvaluationResult,
    out_json: str | Path | None,
    out_md: str | Path | None = None,
    out_png: str | Path | None = None,
) -> None:
    """JSON with every figure (and the protocol text), a Markdown table, a PNG of Recall@K curves; None skips."""
    if out_json is not None:
        Path(out_json).write_text(json.dumps(result.as_dict(), indent=2) + "\n", encoding="utf-8")
    if out_md is not None:
        Path(out_md).write_text(markdown_summary(result), encoding="utf-8")
    if out_png is not None:
        plot_recall_curves(result, out_png)
