"""Temporal training data for the ranker (``pymk train ranker --data PATH``), and the training run itself.

The replay mirrors what the worker does online, at several checkpoint times t:

1. **State as of t.** Every event with ts < t is applied, in time order, to a :class:`MemorySource`; nothing
   at or after t is. :func:`check_no_leakage` (a hard error, not an ``assert`` that ``-O`` strips) verifies
   before every query that the source has seen no event at or after t.
2. **Queries.** Users active at t: at least one connection before t and at least one new connection in
   [t, t + horizon); a sample of them (``queries_per_checkpoint``), plus ``inactive_share`` as many users
   with a connection before t and none in the window (their rows are all negatives: the model must also
   learn who not to bother).
3. **Rows.** Candidates come from the SAME Stage 1 (:func:`pymk.ranking.candidates.generate_candidates`)
   and features from the same builder, as of t. The candidates the scorer in use at t (default: the
   cold-start heuristic) would show (its top ``shown_k``) are rows, labelled 1 when the pair connects within
   the horizon, else 0 (shown, not taken). Candidates that were not shown but connect are rows too (label 1):
   they are what the model has to lift into the list.
   **Plus ``unshown_negatives`` (default 50) random candidates per query that were neither shown nor
   taken** (label 0). Without them every negative is a top-20 pick of the heuristic and every unshown row a
   positive, so "the heuristic likes it" *predicts a negative* and the model learns to invert the heuristic:
   on CollegeMsg (last checkpoint, 229 active users, all Stage 1 candidates ranked, recall over all their
   future partners) that model reached Recall@20 0.009 against the heuristic's 0.052; with 20 / 50 / 200
   random unshown negatives 0.080 / 0.071 / 0.084. The rows' ``shown`` flag tells them apart.
   Those random rows are **weighted** by how many unshown negatives each stands for (then rescaled so a
   query's negative weights sum to its negative row count): unweighted, the rows over-represent the
   heuristic's top among the negatives, so "high Adamic-Adar" looks worse than it is. On ego-Facebook
   (holdout replay) the unweighted model reached Recall@20 0.43, the weighted one 0.66 (RA: 0.67); on
   CollegeMsg 0.125 → 0.145.
4. **Split by time.** Validation = the rows of the last ``val_checkpoints`` checkpoint(s), training = the
   earlier ones, so the model is judged on a future it did not see. Row AUC on that split is biased by the
   row selection above (the heuristic's own AUC there is far below 0.5), so the validation queries also keep
   every Stage 1 candidate (:class:`RankingCase`) and the report gives Recall@20 over the full candidate
   lists for the model and for the heuristic: the number that says whether the model ranks better.

Checkpoints default to 50%, 60%, 70%, 80%, 90% of the connection sequence (by count, like the contract's
80/20 split; CollegeMsg's activity is front-loaded, so fractions of wall-clock time would leave the late
checkpoints almost empty). t is the ts of the connection at that position.

**Holdout replay** (``replay="holdout"``, the default for untimed edge lists): the line order of an untimed
file is not time (ego-Facebook's is grouped by ego network), so instead of checkpoints a seeded random
``holdout_fraction`` of the pairs is hidden (with every later interaction of those pairs), features are
computed on the visible rest, and labels are the hidden pairs; validation = the rows of a random
``holdout_val_share`` of the query users. That is the task of a random split: which edges are missing?

Holdout folds (``holdout_folds``, default 4): the hidden pairs are cut into folds, each hidden on its own with
the other folds visible, so the features of a row are computed on 95 % of the graph, not 80 %: the serving graph
(the whole past) has 1/0.8 = 1.25 times the degrees and counts of an 80 % graph, and trees split on absolute
thresholds. On ego-Facebook one 5 % holdout took the future Recall@20 from 0.6625 (one 20 % holdout) to 0.6695.

Label horizon: ``horizon_days`` (default 14) for timed data. Untimed files (ego-Facebook, CA-HepPh) are
replayed one connection per step (:data:`pymk.datasets.UNTIMED_STEP_MS`), so their horizon is measured in
connection steps: ``horizon_steps`` connections after t (default: 10% of the connections, the gap between
two checkpoints).

Behaviour in real edge lists: a repeated interaction of an already-connected pair
(:attr:`EdgeHistory.repeats`) is replayed as a profile view; candidates are never connected, so their
behavioural features stay 0/NaN on such data. Event streams with behaviour and profiles
(:func:`pymk.synthetic.synthetic_network`) can be replayed as they are with :func:`build_training_data`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from pymk.datasets import UNTIMED_STEP_MS, EdgeHistory, load_edge_history
from pymk.events import ConnectionEvent, InputEvent, ProfileViewEvent
from pymk.learning import LeakageError, roc_auc
from pymk.ranking.candidates import CandidateConfig
from pymk.ranking.cascade import ListSample, attach_cascade, list_scores
from pymk.ranking.features import FEATURE_INDEX, N_FEATURES, STRUCTURE_FEATURES, FeatureBuilder
from pymk.ranking.heuristic import REFERENCE_HEURISTIC_COLUMNS, HeuristicScorer
from pymk.ranking.memory_source import MemorySource
from pymk.ranking.model import HeuristicFloor, Ranker, RankerConfig
from pymk.ranking.recommend import ranking_order, score_candidates
from pymk.ranking.source import Scorer

DAY_MS = 86_400_000
_DEGREE_COLUMN = FEATURE_INDEX["candidate_degree_log"]

# (past-only source, as-of ms) → embeddings of users as of then, e.g. GraphSAGE run on the past graph.
EmbeddingsAt = Callable[[MemorySource, int], Mapping[int, np.ndarray]]


def embeddings_at_checkpoint(model_dir: Path) -> EmbeddingsAt:
    """For the ranker's temporal replay: every user's GraphSAGE embedding on the past-only graph at a checkpoint
    (the model itself is fixed; it should have been trained on data before the evaluated period)."""
    from pymk.index.embedder import Embedder, salt_for_version
    from pymk.index.sage import load_model

    model, metadata = load_model(model_dir)
    salt = salt_for_version(str(metadata["version"]))

    def embed(source: MemorySource, as_of_ms: int) -> dict[int, np.ndarray]:
        users = sorted(source.users())
        if not users:
            return {}
        vectors = Embedder(model, source, source).embed(users, salt)
        return dict(zip(users, vectors, strict=True))

    return embed


def check_no_leakage(source: MemorySource, as_of_ms: int) -> None:
    latest = source.latest_event_ts
    if latest is not None and latest >= as_of_ms:
        raise LeakageError(f"the source holds an event at ts {latest}, not before the as-of time {as_of_ms}")


@dataclass(frozen=True)
class TrainingDataConfig:
    horizon_days: float = 14.0  # label window after t, timed data
    horizon_steps: int | None = None  # label window in connection steps, untimed data (None: 10% of connections)
    checkpoint_fractions: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)  # positions in the connection sequence
    checkpoint_times_ms: tuple[int, ...] | None = None  # explicit checkpoint times (override the fractions)
    # active query users sampled per checkpoint: positives are the scarce rows (Digg replies: ~250 of 500 queries'
    # future pairs are in their candidate sets), and a query costs a Stage 1 and a matrix (~1-3 ms)
    queries_per_checkpoint: int = 2000
    inactive_share: float = 0.25  # plus this share of it in users without a new connection in the window
    shown_k: int = 20  # what the scorer in use shows (the negatives)
    unshown_negatives: int = 50  # plus this many random candidates per query that were neither shown nor taken
    # Weight the sampled unshown negatives by how many they stand for (see the module doc), so that the rows
    # estimate the loss over every candidate, not over a sample that over-represents the heuristic's top.
    weight_sampled_negatives: bool = True
    val_checkpoints: int = 1  # the last checkpoints form the validation split
    candidate_config: CandidateConfig = field(default_factory=CandidateConfig)
    seed: int = 0
    # "temporal": checkpoints in time (above); "holdout": hide a random share of the connections and label the
    # hidden ones (below); "auto": temporal for timed data, holdout for untimed edge lists, whose line order
    # is not time (ego-Facebook's file is grouped by ego network: "the next 10% of lines" is not a future).
    replay: str = "auto"
    holdout_fraction: float = 0.2  # share of the connections hidden (the contract's random split hides 20%)
    holdout_queries: int = 2000  # query users sampled among those with a hidden connection
    holdout_val_share: float = 0.2  # share of the query users whose rows form the validation split
    # The hidden pairs are cut into this many folds, each hidden on its own with the rest visible, so features
    # are computed on a graph of nearly the serving graph's scale (95 % of it with 4 folds, 80 % with 1): the
    # same rows and labels in total, the degrees and counts the model will see when serving.
    holdout_folds: int = 4
    # the worker's PYMK_HUB_DEGREE: no 2-path through a user of more connections (0: none), so the rows' graph
    # columns are those the worker serves under the cap (MemorySource's hub_degree)
    hub_degree: int = 0

    def __post_init__(self) -> None:
        if self.horizon_days <= 0 or (self.horizon_steps is not None and self.horizon_steps < 1):
            raise ValueError("the label horizon must be positive")
        if not all(0.0 < f < 1.0 for f in self.checkpoint_fractions):
            raise ValueError("checkpoint fractions must be in (0, 1)")
        if self.val_checkpoints < 1 or self.shown_k < 1 or self.queries_per_checkpoint < 1:
            raise ValueError("val_checkpoints, shown_k and queries_per_checkpoint must be at least 1")
        if self.replay not in ("auto", "temporal", "holdout"):
            raise ValueError(f"replay must be 'auto', 'temporal' or 'holdout', not {self.replay!r}")
        if self.holdout_folds < 1:
            raise ValueError("holdout_folds must be at least 1")
        if self.hub_degree < 0:
            raise ValueError("hub_degree must be 0 (no hubs) or positive")
        if not 0.0 < self.holdout_fraction < 1.0 or not 0.0 < self.holdout_val_share < 1.0:
            raise ValueError("holdout_fraction and holdout_val_share must be in (0, 1)")

    def replay_for(self, timed: bool) -> str:
        """The replay actually used for data that is (or is not) timed."""
        return self.replay if self.replay != "auto" else "temporal" if timed else "holdout"


@dataclass(frozen=True)
class RankingCase:
    """Every Stage 1 candidate of one validation query, to measure Recall@k of a scorer over the full list."""

    user: int
    ids: np.ndarray
    features: np.ndarray  # (n, 17) float32
    positive: np.ndarray  # bool: connects within the horizon
    partners: int  # future partners already in the graph at t (the recall denominator)


@dataclass(frozen=True)
class TrainingData:
    features: np.ndarray  # (n, 17)
    labels: np.ndarray  # (n,) 0/1
    groups: np.ndarray  # (n,) one id per (checkpoint, query user)
    ts: np.ndarray  # (n,) the checkpoint time (as-of) of each row
    users: np.ndarray  # (n,) query user
    candidates: np.ndarray  # (n,) candidate
    shown: np.ndarray  # (n,) bool: in the scorer's top shown_k
    is_val: np.ndarray  # (n,) bool: in the validation split
    checkpoints: tuple[int, ...]
    horizon_ms: int
    horizon_label: str  # "14 days" or "N connection steps"
    stats: dict[str, Any]
    val_cases: tuple[RankingCase, ...] = ()  # every candidate of each validation query, for Recall@k
    weights: np.ndarray | None = None  # (n,) row weights for training (None: all 1)

    def row_weights(self) -> np.ndarray:
        return np.ones(len(self.labels)) if self.weights is None else self.weights

    def __len__(self) -> int:
        return len(self.labels)

    def train_split(self) -> tuple[np.ndarray, np.ndarray]:
        return self.features[~self.is_val], self.labels[~self.is_val]

    def val_split(self) -> tuple[np.ndarray, np.ndarray]:
        return self.features[self.is_val], self.labels[self.is_val]


def history_events(history: EdgeHistory) -> list[InputEvent]:
    """An edge history as input events: its connections, and its repeats as profile views, in ts order."""
    events: list[tuple[int, int, InputEvent]] = [(ts, 0, ConnectionEvent(u, v, "add", ts))
                                                  for u, v, ts in history.connections]
    events += [(ts, 1, ProfileViewEvent(src, dst, ts)) for src, dst, ts in history.repeats]
    events.sort(key=lambda item: (item[0], item[1]))
    return [event for _, _, event in events]


def new_connections(events: Sequence[InputEvent]) -> list[tuple[int, int, int]]:
    """(u, v, ts) of every add that connects a pair not connected at that moment, in order."""
    alive: set[tuple[int, int]] = set()
    out: list[tuple[int, int, int]] = []
    for event in events:
        if not isinstance(event, ConnectionEvent) or event.src == event.dst:
            continue
        pair = (min(event.src, event.dst), max(event.src, event.dst))
        if event.action == "remove":
            alive.discard(pair)
        elif pair not in alive:
            alive.add(pair)
            out.append((pair[0], pair[1], event.ts))
    return out


@dataclass(frozen=True)
class QueryExamples:
    user: int
    candidates: np.ndarray  # the kept rows' candidate ids
    features: np.ndarray  # (rows, 17)
    labels: np.ndarray  # int8
    shown: np.ndarray  # bool
    case: RankingCase | None  # every candidate (when asked for)
    weights: np.ndarray | None = None  # per row (None: all 1)


def checkpoint_examples(source: MemorySource, as_of_ms: int, queries: Sequence[int],
                        future_partners: Mapping[int, set[int]], scorer: Scorer, config: TrainingDataConfig,
                        builder: FeatureBuilder, rng: np.random.Generator | None = None,
                        keep_cases: bool = False) -> list[QueryExamples]:
    """The kept rows of each query user as of ``as_of_ms`` (see the module doc); refuses a leaky source."""
    rng = rng or np.random.default_rng(config.seed)
    out: list[QueryExamples] = []
    for user in queries:
        check_no_leakage(source, as_of_ms)
        scored = score_candidates(user, source, scorer, config.candidate_config, as_of_ms, config.shown_k,
                                  builder=builder)
        ids = scored.candidates.ids
        partners = future_partners.get(user, set())
        positive = np.isin(ids, np.fromiter(partners, np.int64, len(partners)))
        shown = np.zeros(len(ids), bool)
        shown[scored.top] = True
        keep = shown | positive
        rest = np.flatnonzero(~keep)
        weights = np.ones(len(ids))
        if config.unshown_negatives and len(rest):
            sampled = rng.choice(rest, min(len(rest), config.unshown_negatives), replace=False)
            keep[sampled] = True
            if config.weight_sampled_negatives:
                # Horvitz-Thompson: each sampled row stands for len(rest)/len(sampled) unshown negatives. Then
                # the query's negative weights are scaled to sum to its negative row count: the class balance
                # stays that of the rows, only the mix of shown and unshown negatives is corrected.
                weights[sampled] = len(rest) / len(sampled)
                negatives = keep & ~positive
                weights[negatives] *= negatives.sum() / weights[negatives].sum()
        case = None
        known = sum(1 for p in partners if source.degree(p) > 0) if keep_cases else 0
        if known:  # a partner who is not in the graph yet is a cold-start case, not a ranking miss
            case = RankingCase(user, ids, scored.features.astype(np.float32), positive, known)
        out.append(QueryExamples(user, ids[keep], scored.features[keep], positive[keep].astype(np.int8),
                                 shown[keep], case, weights[keep]))
    return out


def recall_at_k(scorer: Scorer, cases: Sequence[RankingCase], k: int = 20) -> float:
    """Mean over cases of |top k by ``scorer`` ∩ future partners| / |future partners in the graph at t|, the
    contract's tie rule (score, degree, id); NaN without cases."""
    recalls = []
    for case in cases:
        if case.partners == 0:
            continue
        scores = list_scores(scorer, case.features, case.ids)[0] if len(case.ids) else np.empty(0)
        top = ranking_order(scores, case.features[:, _DEGREE_COLUMN], case.ids, k)
        recalls.append(int(case.positive[top].sum()) / case.partners)
    return float(np.mean(recalls)) if recalls else math.nan


class ValidationLists:
    """The validation queries' whole Stage 1 lists as a :class:`pymk.ranking.model.ListMetric`: Recall@``k``
    of scores given for every row of :attr:`features` (the lists stacked), by the contract's tie rule."""

    def __init__(self, cases: Sequence[RankingCase], k: int = 20) -> None:
        self.cases = [case for case in cases if case.partners > 0]
        self.k = k
        width = N_FEATURES
        self.features = (np.concatenate([case.features for case in self.cases]) if self.cases
                         else np.empty((0, width), np.float32))
        self.bounds = np.cumsum([0] + [len(case.ids) for case in self.cases])

    def __len__(self) -> int:
        return len(self.cases)

    def per_query(self, scores: np.ndarray) -> np.ndarray:
        """Recall@k of each validation query."""
        scores = np.asarray(scores, np.float64)
        recalls = np.empty(len(self.cases))
        for i, case in enumerate(self.cases):
            top = ranking_order(scores[self.bounds[i] : self.bounds[i + 1]], case.features[:, _DEGREE_COLUMN],
                                case.ids, self.k)
            recalls[i] = int(case.positive[top].sum()) / case.partners
        return recalls

    def __call__(self, scores: np.ndarray) -> float:
        return float(self.per_query(scores).mean()) if self.cases else math.nan


# Weights of the heuristic's term tried in a blend (the margin is in log-odds; h is ~1 at the column's mean).
FLOOR_BLEND_WEIGHTS: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)


# How sure validation must be that a heuristic beats the trees before the floor steps in: the heuristic's mean
# Recall@20 over the validation queries must exceed the trees' by this many standard errors of the per-query
# difference. Validation sets are a few hundred queries: on CollegeMsg (335) popularity led the trees by 0.018
# while the trees beat it on the future by 2x; a floor on any lead would have cut the product by 40 %.
FLOOR_MIN_STANDARD_ERRORS = 2.0


def choose_floor(ranker: Ranker, lists: ValidationLists, train_features: np.ndarray, train_labels: np.ndarray
                 ) -> tuple[HeuristicFloor | None, dict[str, Any]]:
    """The floor under the trees, chosen on the validation lists: none unless the best reference heuristic (CN,
    AA, RA, popularity) beats the trees' Recall@20 by :data:`FLOOR_MIN_STANDARD_ERRORS`; then that heuristic
    blended in with the weight that validates best, or that heuristic alone (fallback) when no blend beats it.
    Returns it and the evidence (every figure it was decided on)."""
    if not len(lists):
        return None, {"decision": "model (no validation lists to compare with)", "val_queries": 0}
    margin = np.asarray(ranker.margin(lists.features), np.float64)
    trees = lists.per_query(margin)
    heuristics = {name: lists.per_query(np.nan_to_num(lists.features[:, FEATURE_INDEX[column]], nan=0.0))
                  for name, column in REFERENCE_HEURISTIC_COLUMNS.items()}
    best = max(heuristics, key=lambda name: float(heuristics[name].mean()))  # ties: the first listed
    lead = heuristics[best] - trees
    standard_error = float(lead.std(ddof=1) / math.sqrt(len(lead))) if len(lead) > 1 else math.inf
    evidence: dict[str, Any] = {
        "val_queries": len(lists), "val_recall_at_20_trees": float(trees.mean()),
        "val_recall_at_20_heuristics": {name: float(r.mean()) for name, r in heuristics.items()},
        "best_heuristic": best, "heuristic_lead": float(lead.mean()), "lead_standard_error": standard_error}
    if not float(lead.mean()) > FLOOR_MIN_STANDARD_ERRORS * standard_error:
        return None, {**evidence, "decision": f"model: validation does not say {best} beats its trees "
                                              f"(lead {lead.mean():+.4f}, standard error {standard_error:.4f})"}
    column = REFERENCE_HEURISTIC_COLUMNS[best]
    values = np.nan_to_num(np.asarray(train_features[:, FEATURE_INDEX[column]], np.float64), nan=0.0)
    positive = values[(np.asarray(train_labels) > 0) & (values > 0)]
    scale = float(positive.mean()) if len(positive) else float(values[values > 0].mean()) if (values > 0).any() else 1.0
    blends = {weight: lists(margin + weight * HeuristicFloor(best, column, scale, weight).values(lists.features))
              for weight in FLOOR_BLEND_WEIGHTS}
    evidence["val_recall_at_20_blends"] = {str(w): r for w, r in blends.items()}
    weight = max(blends, key=lambda w: (blends[w], -w))  # ties: the lighter weight
    if blends[weight] > float(heuristics[best].mean()):
        return HeuristicFloor(best, column, scale, weight), {
            **evidence, "decision": f"blend: {best} beats the trees on validation, the trees plus {weight:g} x "
                                    f"h({best}) beat {best}"}
    return HeuristicFloor(best, column, scale, None), {
        **evidence, "decision": f"fallback: {best} beats the trees and every blend on validation"}


_STRUCTURE_COLUMNS = [FEATURE_INDEX[name] for name in STRUCTURE_FEATURES]


def without_structure(features: np.ndarray) -> np.ndarray:
    """A copy of ``features`` with the structure columns NaN: trees fitted on it never split on them."""
    out = np.array(features, copy=True)
    out[:, _STRUCTURE_COLUMNS] = np.nan
    return out


def cascade_inputs(ranker: Ranker, train_x: np.ndarray, val_cases: Sequence[RankingCase]
                   ) -> tuple[np.ndarray, list[ListSample]]:
    """The rows a cascade's pre-ranker is fitted on and the validation lists it is judged on, as the worker will
    score them: without the structure columns when the ranker dropped them (its lists then leave them NaN)."""
    if ranker.reads_structure_columns:
        return train_x, [ListSample(case.features, case.ids, case.features[:, _DEGREE_COLUMN]) for case in val_cases]
    return without_structure(train_x), [ListSample(without_structure(case.features), case.ids,
                                                   case.features[:, _DEGREE_COLUMN]) for case in val_cases]


def choose_structure_columns(with_structure: Ranker, without: Ranker, lists: ValidationLists
                             ) -> tuple[Ranker, dict[str, Any]]:
    """The model trained with the structure columns if its validation Recall@20 is higher than the one trained
    without them (ties: without, the simpler), and the evidence. Both score the same lists (the model trained
    without the columns never reads them)."""
    kept = lists.per_query(np.asarray(with_structure.margin(lists.features), np.float64))
    dropped = lists.per_query(np.asarray(without.margin(lists.features), np.float64))
    gain = kept - dropped
    standard_error = float(gain.std(ddof=1) / math.sqrt(len(gain))) if len(gain) > 1 else math.inf
    keep = float(gain.mean()) > 0.0
    return (with_structure if keep else without), {
        "decision": "kept" if keep else "dropped", "chosen_by": "validation Recall@20",
        "val_queries": len(lists), "val_recall_at_20_with": float(kept.mean()),
        "val_recall_at_20_without": float(dropped.mean()), "gain": float(gain.mean()),
        "gain_standard_error": standard_error}


def choose_min_child_weight(fitted: Mapping[float, Ranker], lists: ValidationLists) -> tuple[float, dict[str, Any]]:
    """The min_child_weight whose model has the highest Recall@20 on the validation lists (ties: the first
    listed), and the evidence: each choice's Recall@20, and the chosen one's lead over the runner-up with its
    standard error over the queries."""
    per_query = {weight: lists.per_query(np.asarray(ranker.margin(lists.features), np.float64))
                 for weight, ranker in fitted.items()}
    means = {weight: float(values.mean()) for weight, values in per_query.items()}
    chosen = max(means, key=lambda weight: means[weight])  # max keeps the first of equal values
    others = [weight for weight in means if weight != chosen]
    runner_up = max(others, key=lambda weight: means[weight]) if others else None
    lead = per_query[chosen] - per_query[runner_up] if runner_up is not None else np.zeros(0)
    return chosen, {
        "min_child_weight": chosen, "chosen_by": "validation Recall@20", "val_queries": len(lists),
        "val_recall_at_20": {f"{weight:g}": value for weight, value in means.items()},
        "trees": {f"{weight:g}": ranker.metadata.get("trees") for weight, ranker in fitted.items()},
        "lead": float(lead.mean()) if len(lead) else None,
        "lead_standard_error": float(lead.std(ddof=1) / math.sqrt(len(lead))) if len(lead) > 1 else None}


def build_training_data(events: Sequence[InputEvent] | EdgeHistory, config: TrainingDataConfig | None = None,
                        scorer: Scorer | None = None, embeddings_at: EmbeddingsAt | None = None,
                        timed: bool | None = None, progress: bool = False) -> TrainingData:
    """Replay ``events`` (time-ordered input events, or an :class:`EdgeHistory`) into training rows.

    ``scorer``: what decides the shown rows (default :class:`HeuristicScorer`). ``embeddings_at``: sets the
    users' embeddings at each checkpoint from the past-only source (without it, ANN and the embedding
    feature are empty). ``timed``: whether ts are real times (default: from the history; True for events).
    """
    config = config or TrainingDataConfig()
    scorer = scorer or HeuristicScorer()
    if isinstance(events, EdgeHistory):
        timed = events.timed if timed is None else timed
        events = history_events(events)
    timed = True if timed is None else timed
    if any(later.ts < earlier.ts for earlier, later in zip(events, events[1:], strict=False)):
        raise ValueError("events must be in ts order")
    connections = new_connections(events)
    if len(connections) < 2:
        raise ValueError("need at least two connections to replay")
    if config.replay_for(timed) == "holdout":
        return _holdout_training_data(events, connections, config, scorer, embeddings_at, timed, progress)
    if timed:
        horizon_ms = int(config.horizon_days * DAY_MS)
        horizon_label = f"{config.horizon_days:g} days"
    else:
        steps = config.horizon_steps or max(1, math.ceil(0.1 * len(connections)))
        horizon_ms = steps * UNTIMED_STEP_MS
        horizon_label = f"{steps} connection steps"
    if config.checkpoint_times_ms is not None:
        checkpoints = sorted(set(config.checkpoint_times_ms))
    else:
        checkpoints = sorted({connections[int(f * len(connections))][2] for f in config.checkpoint_fractions})
    n_val = min(config.val_checkpoints, len(checkpoints) - 1) if len(checkpoints) > 1 else 0
    val_from = checkpoints[len(checkpoints) - n_val] if n_val else None

    rng = np.random.default_rng(config.seed)
    builder = FeatureBuilder()
    examples: list[tuple[int, QueryExamples]] = []  # (checkpoint, rows of one query)
    per_checkpoint: list[dict[str, Any]] = []
    started = time.perf_counter()
    bar = _progress(len(checkpoints), progress)
    for t, source, future in replay_checkpoints(events, connections, checkpoints, horizon_ms, embeddings_at,
                                                hub_degree=config.hub_degree):
        past_users = [u for u in source.users() if source.degree(u) > 0]
        active = sorted(u for u in past_users if u in future)
        inactive = sorted(u for u in past_users if u not in future)
        queries = rng.permutation(active)[: config.queries_per_checkpoint].tolist()
        n_inactive = min(len(inactive), round(config.inactive_share * config.queries_per_checkpoint))
        queries += rng.permutation(inactive)[:n_inactive].tolist()
        found = checkpoint_examples(source, t, queries, future, scorer, config, builder, rng,
                                    keep_cases=val_from is not None and t >= val_from)
        per_checkpoint.append({"t": t, "queries": len(queries), "active": len(active),
                               "rows": sum(len(q.labels) for q in found),
                               "positives": sum(int(q.labels.sum()) for q in found),
                               "future_pairs_of_queries": sum(len(future.get(u, ())) for u in queries)})
        examples.extend((t, q) for q in found)
        bar.update(1)
    bar.close()

    n = sum(len(q.labels) for _, q in examples)
    lengths = [len(q.labels) for _, q in examples]
    features = np.concatenate([q.features for _, q in examples]) if n else np.empty((0, N_FEATURES))
    labels = np.concatenate([q.labels for _, q in examples]) if n else np.empty(0, np.int8)
    shown = np.concatenate([q.shown for _, q in examples]) if n else np.empty(0, bool)
    candidates = np.concatenate([q.candidates for _, q in examples]) if n else np.empty(0, np.int64)
    groups = np.repeat(np.arange(len(examples)), lengths)
    ts = np.repeat(np.array([t for t, _ in examples], np.int64), lengths)
    users = np.repeat(np.array([q.user for _, q in examples], np.int64), lengths)
    is_val = ts >= val_from if val_from is not None else np.zeros(n, bool)
    cases = tuple(q.case for _, q in examples if q.case is not None)
    stats = {"connections": len(connections), "events": len(events), "timed": timed,
             "seconds": round(time.perf_counter() - started, 2), "checkpoints": per_checkpoint,
             "rows": int(n), "positives": int(labels.sum()), "shown_positives": int(labels[shown].sum()),
             "val_rows": int(is_val.sum()), "val_positives": int(labels[is_val].sum()),
             "val_checkpoints": n_val, "scorer": scorer.version}
    weights = _weights([q for _, q in examples])
    return TrainingData(features, labels, groups, ts, users, candidates, shown, is_val, tuple(checkpoints),
                        horizon_ms, horizon_label, stats, cases, weights)


def replay_checkpoints(events: Sequence[InputEvent], connections: Sequence[tuple[int, int, int]],
                       checkpoints: Sequence[int], horizon_ms: int, embeddings_at: EmbeddingsAt | None = None,
                       hub_degree: int = 0) -> Iterator[tuple[int, MemorySource, dict[int, set[int]]]]:
    """The temporal replay: at each checkpoint t (ascending), one source holding exactly the events before t
    (checked: :func:`check_no_leakage`), its embeddings as of t when ``embeddings_at`` is given, and each user's
    future partners — pairs that connect in [t, t + ``horizon_ms``) and are not connected at t. The source is the
    same object throughout, advanced from one checkpoint to the next. ``hub_degree``: MemorySource's."""
    source = MemorySource(hub_degree=hub_degree)
    next_event = 0
    for t in checkpoints:
        while next_event < len(events) and events[next_event].ts < t:
            source.apply(events[next_event])
            next_event += 1
        check_no_leakage(source, t)
        if embeddings_at is not None:
            source.set_embeddings(dict(embeddings_at(source, t)))
        future: dict[int, set[int]] = {}
        for u, v, ts in connections:
            if t <= ts < t + horizon_ms and v not in source.neighbours(u):
                future.setdefault(u, set()).add(v)
                future.setdefault(v, set()).add(u)
        yield t, source, future


def holdout_pairs(connections: Sequence[tuple[int, int, int]], fraction: float, seed: int) -> set[tuple[int, int]]:
    """The hidden pairs (u < v) of a holdout replay: a seeded random ``fraction`` of the connections. Public so
    that an embedding model can be trained on the visible rest (see :mod:`pymk.ranking.product`)."""
    pairs = sorted({(min(u, v), max(u, v)) for u, v, _ in connections})
    rng = np.random.default_rng(seed)
    hidden = rng.choice(len(pairs), int(fraction * len(pairs)), replace=False)
    return {pairs[i] for i in hidden.tolist()}


def holdout_folds(hidden: set[tuple[int, int]], config: TrainingDataConfig) -> list[set[tuple[int, int]]]:
    """The hidden pairs cut into ``config.holdout_folds`` seeded folds of (nearly) equal size."""
    ordered = sorted(hidden)
    order = np.random.default_rng([config.seed, 1]).permutation(len(ordered))
    return [{ordered[i] for i in part.tolist()} for part in np.array_split(order, config.holdout_folds)]


def visible_events(events: Sequence[InputEvent], hidden: set[tuple[int, int]]) -> list[InputEvent]:
    """``events`` without any event of a hidden pair: its connection, and its later interactions (a profile
    view between the two would give the hidden connection away)."""
    def pair_of(event: InputEvent) -> tuple[int, int] | None:
        if isinstance(event, ConnectionEvent):
            return min(event.src, event.dst), max(event.src, event.dst)
        if isinstance(event, ProfileViewEvent):
            return min(event.viewer, event.viewed), max(event.viewer, event.viewed)
        return None

    return [event for event in events if pair_of(event) not in hidden]


def holdout_fold(events: Sequence[InputEvent], fold: Collection[tuple[int, int]], embeddings_at: EmbeddingsAt | None,
                 hub_degree: int = 0) -> tuple[MemorySource, int, dict[int, set[int]]]:
    """One fold of a holdout replay: (the graph as it stands without the fold's pairs, as of just after its last
    event, with embeddings of that graph; the as-of time; each user → its hidden partners, both seen in that
    graph). Only this fold's pairs are hidden: the other folds' are visible, so degrees and counts are
    (1 - fraction / folds) of the serving graph's, not (1 - fraction) of it. Guarded: nothing at or after the
    as-of time, no hidden pair connected. ``hub_degree``: MemorySource's."""
    source = MemorySource(hub_degree=hub_degree)
    source.apply_all(visible_events(events, fold))
    as_of = (source.latest_event_ts or 0) + 1
    check_no_leakage(source, as_of)
    if any(v in source.neighbours(u) for u, v in fold):
        raise LeakageError("a hidden pair is connected in the visible graph")
    if embeddings_at is not None:
        source.set_embeddings(dict(embeddings_at(source, as_of)))
    future: dict[int, set[int]] = {}
    for u, v in fold:
        if source.degree(u) and source.degree(v):  # a pair with a user unseen in the visible graph: cold start
            future.setdefault(u, set()).add(v)
            future.setdefault(v, set()).add(u)
    return source, as_of, future


def _holdout_training_data(events: Sequence[InputEvent], connections: list[tuple[int, int, int]],
                           config: TrainingDataConfig, scorer: Scorer, embeddings_at: EmbeddingsAt | None,
                           timed: bool, progress: bool) -> TrainingData:
    """Rows of a holdout replay: every event except those of ``holdout_fraction`` of the pairs, as of just after
    the last event; labels = the hidden pairs. This is what the random split asks of a model (which edges of
    the graph are missing?), where a temporal replay would ask about the file's next lines. Validation: the
    rows of a random ``holdout_val_share`` of the query users."""
    started = time.perf_counter()
    hidden = holdout_pairs(connections, config.holdout_fraction, config.seed)
    folds = holdout_folds(hidden, config)
    rng = np.random.default_rng(config.seed)
    builder = FeatureBuilder()
    bar = _progress(config.holdout_queries, progress, "query")
    found: list[QueryExamples] = []
    val_users: set[int] = set()
    per_fold: list[dict[str, Any]] = []
    as_of = 0
    for fold in folds:
        source, as_of, future = holdout_fold(events, fold, embeddings_at, hub_degree=config.hub_degree)
        past_users = sorted(u for u in source.users() if source.degree(u) > 0)
        active = sorted(future)
        inactive = [u for u in past_users if u not in future]
        queries = rng.permutation(active)[: math.ceil(config.holdout_queries / len(folds))].tolist()
        queries += rng.permutation(inactive)[: round(config.inactive_share * len(queries))].tolist()
        fold_val = set(rng.permutation(queries)[: round(config.holdout_val_share * len(queries))].tolist())
        fold_found: list[QueryExamples] = []
        for query in queries:
            fold_found += checkpoint_examples(source, as_of, [query], future, scorer, config, builder, rng,
                                              keep_cases=query in fold_val)
        found += fold_found  # a user drawn in two folds and validation in one: all its rows go to validation
        val_users |= fold_val
        per_fold.append({"t": as_of, "queries": len(queries), "active": len(active),
                         "rows": sum(len(q.labels) for q in fold_found),
                         "positives": sum(int(q.labels.sum()) for q in fold_found),
                         "future_pairs_of_queries": sum(len(future.get(u, ())) for u in queries)})
        bar.update(len(queries))
    bar.close()
    lengths = [len(q.labels) for q in found]
    n = sum(lengths)
    features = np.concatenate([q.features for q in found]) if n else np.empty((0, N_FEATURES))
    labels = np.concatenate([q.labels for q in found]) if n else np.empty(0, np.int8)
    shown = np.concatenate([q.shown for q in found]) if n else np.empty(0, bool)
    candidates = np.concatenate([q.candidates for q in found]) if n else np.empty(0, np.int64)
    users = np.repeat(np.array([q.user for q in found], np.int64), lengths)
    is_val = np.isin(users, np.fromiter(val_users, np.int64, len(val_users)))
    cases = tuple(q.case for q in found if q.case is not None and q.user in val_users)
    label = (f"{len(hidden)} hidden connections ({config.holdout_fraction:.0%}) in {len(folds)} folds hidden one "
             f"at a time")
    stats = {"connections": len(connections), "events": len(events), "timed": timed, "replay": "holdout",
             "seconds": round(time.perf_counter() - started, 2),
             "checkpoints": per_fold, "holdout_folds": len(folds),
             "rows": int(n), "positives": int(labels.sum()), "shown_positives": int(labels[shown].sum()),
             "val_rows": int(is_val.sum()), "val_positives": int(labels[is_val].sum()), "val_checkpoints": 0,
             "scorer": scorer.version}
    return TrainingData(features, labels, np.repeat(np.arange(len(found)), lengths), np.full(n, as_of, np.int64),
                        users, candidates, shown, is_val, (as_of,), 0, label, stats, cases, _weights(found))


def _weights(found: Sequence[QueryExamples]) -> np.ndarray:
    parts = [np.ones(len(q.labels)) if q.weights is None else q.weights for q in found]
    return np.concatenate(parts) if parts else np.empty(0)


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool, unit: str = "checkpoint") -> Any:
    if not enabled:
        return _NoProgress()
    from tqdm import tqdm

    return tqdm(total=total, desc=f"{unit}s", unit=unit)


def training_data_from_path(path: str | Path, config: TrainingDataConfig | None = None,
                            progress: bool = False) -> TrainingData:
    return build_training_data(load_edge_history(path), config, progress=progress)


def train_ranker(path: str | Path | EdgeHistory | Sequence[InputEvent], out_dir: str | Path,
                 config: TrainingDataConfig | None = None, ranker_config: RankerConfig | None = None,
                 report: Callable[[str], None] | None = print, progress: bool = False,
                 embeddings_at: EmbeddingsAt | None = None, incumbent: Scorer | None = None,
                 floor_enabled: bool = True) -> Ranker:
    """Build temporal training data, train (early stopping on the validation lists' Recall@20), put the floor
    under it (:func:`choose_floor`; ``floor_enabled=False``: the trees alone), save into ``out_dir`` and report
    (AUC, rows, positives, Recall@20 against the heuristics, importances). ``path``: an edge-list file, a loaded
    :class:`EdgeHistory`, or time-ordered input events (e.g. :func:`pymk.synthetic.synthetic_network`).
    ``incumbent``: the model in service, measured on the same validation labels (``incumbent_val_*`` in the
    metadata) so the caller can decide whether the new one replaces it."""
    config = config or TrainingDataConfig()
    ranker_config = ranker_config or RankerConfig()
    if isinstance(path, str | Path):
        data = build_training_data(load_edge_history(path), config, embeddings_at=embeddings_at, progress=progress)
        described = str(path)
    else:
        data = build_training_data(path, config, embeddings_at=embeddings_at, progress=progress)
        described = path.path if isinstance(path, EdgeHistory) else f"{len(path)} input events"
    train_x, train_y = data.train_split()
    val_x, val_y = data.val_split()
    weights = data.row_weights()
    if len(train_y) == 0 or train_y.min() == train_y.max():
        raise ValueError(f"{described}: the training split needs positives and negatives ({data.stats})")
    if len(val_y) == 0 or val_y.min() == val_y.max():  # nothing could tell whether the model is any good
        raise ValueError(f"{described}: the validation split needs positives and negatives "
                         f"({data.stats.get('val_rows')} rows, {data.stats.get('val_positives')} positive)")
    heuristic = HeuristicScorer()
    heuristic_auc = roc_auc(val_y, heuristic.predict(val_x)) if len(val_y) else math.nan
    metadata: dict[str, Any] = {
        "label_horizon": data.horizon_label, "label_horizon_ms": data.horizon_ms, "data": described,
        "checkpoints_ms": list(data.checkpoints), "shown_k": config.shown_k,
        "unshown_negatives": config.unshown_negatives,
        "data_stats": {k: v for k, v in data.stats.items() if k != "checkpoints"},
        "heuristic_val_auc": _or_none(heuristic_auc),
    }
    lists = ValidationLists(data.val_cases, 20)

    def fit(drop_structure: bool, config: RankerConfig) -> Ranker:
        train, val = (without_structure(train_x), without_structure(val_x)) if drop_structure else (train_x, val_x)
        return Ranker.train(train, train_y, val, val_y, config, metadata, weights=weights[~data.is_val],
                            val_weights=weights[data.is_val],
                            list_metric=lists if len(lists) and config.stop_on == "recall@20" else None)

    # the regularisation first (with the structure columns unless they are dropped outright), then the columns
    drop_outright = ranker_config.structure_columns == "drop"
    if len(ranker_config.min_child_weight_choices) > 1 and len(lists):
        fitted = {weight: fit(drop_outright, replace(ranker_config, min_child_weight=weight))
                  for weight in ranker_config.min_child_weight_choices}
        chosen, regularisation = choose_min_child_weight(fitted, lists)
        ranker_config = replace(ranker_config, min_child_weight=chosen)
        first = fitted[chosen]
    else:
        if len(ranker_config.min_child_weight_choices) == 1:  # one choice is no choice; none: min_child_weight
            ranker_config = replace(ranker_config, min_child_weight=ranker_config.min_child_weight_choices[0])
        regularisation = {"min_child_weight": ranker_config.min_child_weight, "chosen_by": "config"}
        first = fit(drop_outright, ranker_config)
    if ranker_config.structure_columns == "validate" and len(lists):
        ranker, evidence = choose_structure_columns(first, fit(True, ranker_config), lists)
        ranker.metadata["structure_columns"] = evidence
    else:
        ranker = first
        ranker.metadata["structure_columns"] = {"decision": "dropped" if drop_outright else "kept",
                                                "chosen_by": "config"}
    ranker.metadata["regularisation"] = regularisation
    if floor_enabled:
        floor, evidence = choose_floor(ranker, lists, train_x, train_y)
        ranker = ranker.with_floor(floor, evidence)
    # the cascade last: its pre-ranker is fitted to the margins the ranker serves (floor included), and kept only
    # when the validation lists' top 20 through it equal the full model's (ranking/cascade.py)
    ranker, _ = attach_cascade(ranker, *cascade_inputs(ranker, train_x, data.val_cases), ranker_config.cascade)
    ranker.metadata["val_recall_at_20"] = _or_none(recall_at_k(ranker, data.val_cases, 20))
    ranker.metadata["heuristic_val_recall_at_20"] = _or_none(recall_at_k(heuristic, data.val_cases, 20))
    ranker.metadata["val_ranking_queries"] = len(data.val_cases)
    if incumbent is not None:
        ranker.metadata["incumbent_version"] = incumbent.version
        ranker.metadata["incumbent_val_recall_at_20"] = _or_none(recall_at_k(incumbent, data.val_cases, 20))
        ranker.metadata["incumbent_val_auc"] = (_or_none(roc_auc(val_y, np.asarray(incumbent.predict(val_x))))
                                                if len(val_y) else None)
    ranker.save(out_dir)
    if report is not None:
        report(training_report(data, ranker, heuristic_auc, out_dir))
    return ranker


def _or_none(value: float) -> float | None:
    return None if math.isnan(value) else value


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.4f}"


def training_report(data: TrainingData, ranker: Ranker, heuristic_auc: float, out_dir: str | Path) -> str:
    stats = data.stats
    meta = ranker.metadata
    lines = [f"training data: {stats['rows']} rows ({stats['positives']} positive, {stats['shown_positives']} of "
             f"them shown by {stats['scorer']}) from {len(data.checkpoints)} checkpoints, label horizon "
             f"{data.horizon_label}, built in {stats['seconds']} s",
             "  checkpoint        queries  active  rows  positives  future pairs of queries"]
    for row in stats["checkpoints"]:
        lines.append(f"  {row['t']:>16d}  {row['queries']:7d}  {row['active']:6d}  {row['rows']:5d}  "
                     f"{row['positives']:9d}  {row['future_pairs_of_queries']:d}")
    if stats["val_rows"]:
        lines.append(f"validation (last {stats['val_checkpoints']} checkpoint(s)): {stats['val_rows']} rows, "
                     f"{stats['val_positives']} positive; row AUC model {_fmt(meta.get('val_auc'))}, heuristic "
                     f"{_fmt(heuristic_auc)} (biased by the row selection)")
        lines.append(f"validation Recall@20 over all Stage 1 candidates of {meta.get('val_ranking_queries')} "
                     f"active users: model {_fmt(meta.get('val_recall_at_20'))}, heuristic "
                     f"{_fmt(meta.get('heuristic_val_recall_at_20'))}")
        if "floor_evidence" in meta:
            lines.append(f"floor: {meta['floor_evidence'].get('decision')}")
    else:
        lines.append("validation: no rows")
    lines.append(ranker.describe())
    lines.append(f"saved to {out_dir}")
    return "\n".join(lines)

