"""Incremental lists: each owed user's Stage 1 candidates and feature matrix kept between lists, updated in place
from the state, re-scored only where a row's score can have changed, and re-ordered.

Pure (no Kafka): the worker (streams/refresh.py), the benches and the tests drive the same code.

**What an update re-reads** (every update, whatever the event): the user's exclusions (self, connections,
dismissals with their expiry, blocks), the popular list, the user's own degree, activity, profile and embedding.
From a source with change stamps (:class:`~pymk.ranking.source.ChangeStampSource`) only what moved since the
entry's last read: the rows whose degree or activity changed (→ jaccard, degree columns, the tie key, the held
activity), whose embedding changed (→ cosine) or whose profile changed (→ the profile columns), and the user's
views and co-engagements when their stamps moved (the maps are kept on the entry while they stand; with an
:class:`~pymk.ranking.source.ItemEngagementSource` the co-engagements of only the users of the items whose stamp
moved are recounted, :func:`_engaged_delta`, an engagement moving one item's engagers). From a source
without stamps: every candidate's degree, held activity and embedding, the co-engagements (another user's
engagement moves them without touching this user), and the views when the user viewed or was viewed
(:meth:`IncrementalLists.mark_views_changed`); the candidates' profiles are not re-read. The user's own degree or
embedding moving re-reads that column for every row. After a change of the user's 2-hop maps
(:meth:`IncrementalLists.mark_graph_changed`: an own connection, or a neighbour's, which moves the 2-hop set and
the AA/RA weights) the maps, whole, as arrays by id (what Stage 1 reads): new 2-hop users get rows, rows that left
the 2-hop set lose their ``graph`` source (and their row when it was their only one), CN/AA/RA follow. A dropped
row (dismissed, now a connection) is removed. Rows stay in Stage 1's rough-score order, so the arrays are the full
path's, row for row (the unshown-impressions sample follows).

**What is re-scored**: the rows where some feature crossed one of the model's split thresholds. A tree ensemble
reads a feature only through ``x < threshold`` (in float32; NaN its own side): while every such comparison keeps its
outcome the row's leaves, hence its score, are bit for bit the same, so a changed value re-scores its row only when
its float32 left its bin (:func:`_bins_moved`; without split points, e.g. a ranker serving a heuristic floor, any
change re-scores). For the as-of columns (view recency, the activity columns) the time of the next crossing is
closed-form (a decay ``V·exp(−age/τ)`` falls, a "days since" grows linearly), so each row carries the as-of time
before which its score stands (:func:`_until_falling`, :func:`_until_growing`, with a margin that only makes it
re-score earlier); the rows past it get their as-of columns anew (in one C pass of the evaluator's library,
``kept_rows_as_of``: libm's exp, the bits of ``math.exp``; numpy where the library is not loaded) and are re-scored.
The query-level as-of columns are in every row's bound too (``_query_until``, from the query's held activity); the
query's activity itself moving (an own connection) re-scores every row. A row that is not re-scored keeps its old
as-of column values in the matrix (within the same bins): :meth:`IncrementalLists.score` brings the top k rows to
the as-of time (reasons read them), ``exact_features=True`` all rows, and :meth:`IncrementalLists.exact_features`
the rows a caller logs (the worker's sample of unshown candidates). With the compiled evaluator and a plain ranker
(no floor, no cascade) that tail (the as-of columns of the moved, expired or dirty rows, the dirty rows scored, the
top k ordered and brought to the as-of time) is one C call, ``kept_rows_update``, with the same bits as the steps
(:meth:`_AsOfKernel.update`), and a scored row's validity there comes from **its own paths**: a leaf stands while
the comparisons on the path to it keep their outcomes, so only the thresholds the row's paths pass matter (per leaf,
:func:`_leaf_bounds`: the largest threshold a decaying count went right of, the smallest a growing column went left
of), not every threshold of the column; with the shipped ranker a view's update re-scores ~34 rows at the median
instead of ~180, and the query's two as-of columns count only with the thresholds on the row's paths, so time moving
them re-scores the rows whose paths cross, not every row (1 update in 6 re-scored all ~1,000 rows). A kept list's
second update re-scores every row once, so that every row holds its paths' bound (until then most rows hold the
bound over every threshold, which would re-score them over the next updates, some twice); not the first, as most
kept lists of a busy stream are built anew before a second update. Without split points any move of the query's
columns re-scores every row.

**A full Stage 1 instead** (``reason`` counted in :attr:`ListCacheStats.full_builds`): no entry (``miss``); the
model, the candidate config or k changed (``model``); the entry is older than ``max_age_ms`` (wall clock, or the
as-of time when the caller gives none: ``age``) or had ``max_updates`` updates (``updates``); the owner asked for
it (:meth:`IncrementalLists.invalidate`: ``forced`` by ``pymk refresh``); the user's own profile differs
(``query_profile``: every profile column moves); the as-of time went back (``as_of_back``); a user is no longer
excluded (``unexcluded``: an expired dismissal, a removed connection; the ANN and popular sets would grow); a
dropped row came from an ANN answer that had filled its ``ann_k`` slots and the spare neighbours kept past it ran
out (``ann_fill``); the 2-hop set is or becomes larger than ``graph_k`` and the change touches it, or the popular
list or the user's own embedding moved while it is (``graph_cut``, ``popular``, ``query_embedding``: a new user
may be a 2-hop user below the cut); the degree of a user tied at the graph cut moved (``graph_tie``: ties on count
and AA at the cut are broken by degree); the rough cut to ``max_candidates`` is active and rows change
(``rough_cut``); the source lacks the batch reads this path needs (``source``). A moved popular list or own
embedding (a new ANN answer, asked again) otherwise changes rows in place: sources, cosines, rows added or dropped.

**Memory**: the cache is LRU by bytes (:meth:`ListEntry.measure`). Past its budget it first packs the feature
matrices of the least recently used entries (:class:`PackedMatrix`: constant columns once, float32-exact columns as
float32, decided by comparing bits, so the matrix unpacked is the same bits; ~2/3 of the bytes of a list), and
evicts entries only when every entry is packed. An update unpacks its entry's matrix (~0.1 ms); packing (~0.3 ms)
is paid only under memory pressure, so a cache with room keeps every matrix as it is.

**A cascade** (a scorer with a :class:`~pymk.ranking.cascade.Prefilter`): the entry also holds every row's
pre-ranker margin and, where computed, its full-model score. An update gives the moved rows new margins (and
forgets their full scores), selects the passed rows again (:func:`~pymk.ranking.cascade.passed_rows`), asks the
full model only for passed rows without a standing score, and composes the list's scores as the full path does
(:func:`~pymk.ranking.cascade.compose`); the split points are both models' thresholds, so a row whose bins hold
keeps both scores.

**Other users' embeddings**: from a source with :class:`~pymk.ranking.source.AnnStampSource`, an update whose
source says some embedding moved since the entry's ANN answer asks it again (the full path's call, with the same
exclusions) and, when it differs from the kept ANN rows, changes them in place as a moved own embedding does
(``ann_moved`` when a cut is active: a full build).

What can then be stale, bounded by ``max_age_ms`` / ``max_updates``: from a source without ``AnnStampSource``
the ANN answer of a user whose ANN neighbours' embeddings moved and the candidates' ANN cosines (``ann_score``:
sources and reasons, not features), with
a source without stamps the candidates' profile columns (a profile read per row cost more than the rest of the
update), and, in the worker, what reaches it late from other partitions. The shadow check
(``shadow_fraction``) recomputes a sample of incremental lists fully and counts how often the top k is equal (ids
in order).
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import operator
import time
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from itertools import chain, filterfalse, islice, repeat
from typing import TYPE_CHECKING, Any

import numpy as np

from pymk.ranking.candidates import CandidateConfig, CandidateSet, default_filters, lookup_by_id, two_hop_by_id
from pymk.ranking.cascade import Prefilter, compose, passed_rows
from pymk.ranking.features import (
    COLUMN_GROUPS,
    DAY_MS,
    FEATURE_INDEX,
    FeatureBuilder,
    activity_table_for,
    candidate_degrees,
    implements,
    view_columns,
    view_columns_of_maps,
    view_recency_days,
)
from pymk.ranking.id_index import ids_in
from pymk.ranking.recommend import ScoredCandidates, ranking_order, score_candidates
from pymk.ranking.source import (
    ACTIVITY_TIME_CONSTANTS_MS,
    ActivitySource,
    ActivityTable,
    ActivityTableSource,
    AnnStampSource,
    ChangeStampSource,
    IdArraySource,
    ItemEngagementSource,
    PopularSource,
    RankingSource,
    Scorer,
)

if TYPE_CHECKING:
    from pymk.ranking.tree_eval import CompiledEvaluator

log = logging.getLogger(__name__)

_AA_DECIMALS = 9  # Stage 1's rough order rounds AA + cosine so (candidates.py)
# columns by name (FEATURE_INDEX), so that columns added to the matrix do not move these
_DEGREE = FEATURE_INDEX["candidate_degree_log"]
_RECENCY = FEATURE_INDEX["profile_view_recency_days"]
_ACTIVITY = FEATURE_INDEX["candidate_activity_1d"]  # the candidate's 3 decayed counts, then days since its last change
_DAYS_SINCE = FEATURE_INDEX["candidate_days_since_last_connection"]
_QUERY_ACTIVITY = FEATURE_INDEX["query_activity_7d"]
_QUERY_DAYS = FEATURE_INDEX["query_days_since_last_connection"]
_ROW_AS_OF = (_RECENCY, *range(_ACTIVITY, _DAYS_SINCE + 1))  # the per-row as-of columns
# the behavioural columns that do not move with as-of (view_columns' three, in its order)
_BEHAVIOUR = (FEATURE_INDEX["query_viewed_candidate_profile"], FEATURE_INDEX["mutual_profile_views"],
              FEATURE_INDEX["co_engaged_with_content"])
_NEVER = np.iinfo(np.int64).max
# New rows' behaviour columns come from the held maps when the group is exactly these four (view_columns' three and
# the recency); a group grown by new columns falls back to the matrix's own code
_BEHAVIOUR_GROUP_KNOWN = sorted(COLUMN_GROUPS["behaviour"]) == sorted((*_BEHAVIOUR, _RECENCY))
# the groups a new row's features are computed with by the matrix's code (_add_rows): the behaviour comes from the
# held maps, the candidate's as-of activity columns from the as-of pass and the query's from the update
_GROUPS_ADDED = [group for group in COLUMN_GROUPS if group not in ("behaviour", "activity")]
assert set(COLUMN_GROUPS["activity"]) == {*range(_ACTIVITY, _DAYS_SINCE + 1), _QUERY_ACTIVITY, _QUERY_DAYS}
_GROUPS_ADDED_BUT_GRAPH = [group for group in _GROUPS_ADDED if group not in ("graph", "resource_allocation")]
_TAUS = np.asarray(ACTIVITY_TIME_CONSTANTS_MS, np.int64)
ANN_SPARES = 16  # ANN neighbours kept past ann_k at a full build, to replace dropped ones (dismissed, connected)
_MIX = 0x9E3779B97F4A7C15
_MASK = 0xFFFFFFFFFFFFFFFF
assert _ACTIVITY + len(ACTIVITY_TIME_CONSTANTS_MS) == _DAYS_SINCE  # candidate_activity_columns' layout


# ---- the model's split points -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SplitPoints:
    """Per feature, the model's split thresholds as float64 values of their float32 (sorted, unique), and the same
    lowered by one float32 step (``below``): a growing float64 ``x`` may round up to a threshold ``t`` as float32
    once it passes the float32 just below ``t``."""

    exact: tuple[np.ndarray, ...]
    below: tuple[np.ndarray, ...]
    exact_lists: tuple[list[float], ...]  # ``exact`` as lists, for one value's bin (bisect: no numpy call)
    below_lists: tuple[list[float], ...]  # ``below`` as lists (the query's bound: bisect)

    @classmethod
    def of(cls, per_feature: list[np.ndarray]) -> SplitPoints:
        exact = tuple(np.unique(np.asarray(t, np.float32)).astype(np.float64) for t in per_feature)
        below = tuple(np.unique(np.nextafter(t.astype(np.float32), np.float32(-np.inf))).astype(np.float64)
                      for t in exact)
        return cls(exact, below, tuple(t.tolist() for t in exact), tuple(t.tolist() for t in below))

    def bin(self, column: int, value: float) -> float:
        """Which side of every threshold of ``column`` the float32 of ``value`` is on (NaN: its own bin): the
        number of thresholds at or below it, as ``np.searchsorted(..., side="right")`` counts them."""
        if math.isnan(value):
            return math.nan
        return float(bisect.bisect_right(self.exact_lists[column], float(np.float32(value))))


_SPLIT_POINTS: dict[str, SplitPoints | None] = {}


def split_points(scorer: Scorer, n_features: int) -> SplitPoints | None:
    """The split points of an XGBoost scorer (:class:`pymk.ranking.model.Ranker`), by model version; None for
    another scorer, or a ranker that serves a heuristic floor (its heuristic reads a column continuously, not
    through thresholds): every as-of column then re-scores its row at every update."""
    from pymk.ranking.model import Ranker

    if type(scorer) is not Ranker or scorer.floor is not None:
        return None
    version = scorer.version
    if version not in _SPLIT_POINTS:
        try:
            # a cascade's pre-ranker reads thresholds of its own: a row whose bins hold keeps both models' leaves
            boosters = [scorer.booster] + ([scorer.prefilter.booster] if scorer.prefilter is not None else [])
            per_feature: list[list[float]] = [[] for _ in range(n_features)]
            for booster in boosters:
                learner = json.loads(bytes(booster.save_raw("json")))["learner"]
                for tree in learner["gradient_booster"]["model"]["trees"]:
                    for left, feature, condition in zip(tree["left_children"], tree["split_indices"],
                                                        tree["split_conditions"], strict=True):
                        if left != -1:
                            per_feature[int(feature)].append(float(condition))
            _SPLIT_POINTS[version] = SplitPoints.of([np.asarray(t, np.float64) for t in per_feature])
        except (KeyError, ValueError, IndexError):  # a model shape we do not read: no shortcut
            _SPLIT_POINTS[version] = None
    return _SPLIT_POINTS[version]


def _until_falling(x: np.ndarray, held: np.ndarray, anchor: np.ndarray, tau: float,
                   thresholds: np.ndarray) -> np.ndarray:
    """As-of times (int64) before which ``held · exp(−max(0, as_of − anchor)/τ)``, now ``x``, keeps its side of
    every threshold: it falls below the largest threshold t ≤ x (t > 0) at anchor + τ·ln(held/t). A margin of
    1 ms + 1e-9 of the span makes the row re-score early, never late (the float64 error is ~1e-4 ms)."""
    out = np.full(len(x), _NEVER, np.int64)
    if not len(thresholds) or not len(x):
        return out
    # the value's float32, as the trees compare it: a value just under a threshold that rounds onto it is on its
    # right side, so that threshold is still ahead (its time may be past: the row re-scores at once)
    index = np.searchsorted(thresholds, x.astype(np.float32).astype(np.float64), side="right") - 1
    t = thresholds[np.maximum(index, 0)]
    live = (index >= 0) & (t > 0) & (held > 0)
    if live.any():
        span = tau * np.log(held[live] / t[live])
        out[live] = np.floor(anchor[live] + span - 1.0 - 1e-9 * np.abs(span)).astype(np.int64)
    return out


def _until_growing(x: np.ndarray, base: np.ndarray, thresholds_below: np.ndarray) -> np.ndarray:
    """As-of times (int64) before which ``max(0, as_of − base) / DAY``, now ``x``, keeps its side of every
    threshold: it reaches the smallest lowered threshold t' ≥ float32(x) at base + t'·DAY. NaN (no view, never
    connected) stays NaN."""
    out = np.full(len(x), _NEVER, np.int64)
    if not len(thresholds_below) or not len(x):
        return out
    # x within a float32 step under a threshold is past its lowered value but not yet on its side: the threshold
    # is still ahead (its time already past, so the row re-scores at its next update), not the next one up
    index = np.searchsorted(thresholds_below, x.astype(np.float32).astype(np.float64), side="left")  # NaN: never
    live = index < len(thresholds_below)
    if live.any():
        span = thresholds_below[index[live]] * DAY_MS
        out[live] = np.floor(base[live] + span - 1.0 - 1e-9 * span).astype(np.int64)
    return out


def _bins_moved(points: SplitPoints | None, columns: Sequence[int], old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Per row of the blocks ``old`` and ``new`` (their columns are the matrix's ``columns``): whether some value
    left its bin, i.e. some comparison ``x < threshold`` of the model (in float32; NaN its own bin) can have another
    outcome, so the row's leaves, hence its score, can differ. Without split points: whether some value differs."""
    if old.size <= _SMALL_BLOCK:
        return _bins_moved_small(points, columns, old, new)
    differs = new != old
    if np.isnan(old).any() or np.isnan(new).any():  # NaN == NaN is no change
        differs &= ~(np.isnan(new) & np.isnan(old))
    if points is None or not differs.any():
        return differs.any(axis=1)
    moved = np.zeros(len(old), bool)
    if len(columns) <= _FEW_COLUMNS:
        for j in np.flatnonzero(differs.any(axis=0)).tolist():
            thresholds = points.exact[columns[j]]
            if len(thresholds):  # else a column the model never splits on
                rows = np.flatnonzero(differs[:, j])
                moved[rows[_bins(thresholds, old[rows, j]) != _bins(thresholds, new[rows, j])]] = True
        return moved
    # a wide block (the graph columns): the columns that moved in most rows first (a query-level one, e.g. the
    # query's degree, moves in all); once every row is known to have moved, no other column needs a look
    differing = differs.sum(axis=0)
    for j in np.argsort(-differing, kind="stable")[: int(np.count_nonzero(differing))].tolist():
        thresholds = points.exact[columns[j]]
        if not len(thresholds):
            continue
        rows = np.flatnonzero(differs[:, j] & ~moved)  # a row already moved needs no other column's word
        if not len(rows):
            continue
        moved[rows[_bins(thresholds, old[rows, j]) != _bins(thresholds, new[rows, j])]] = True
        if moved.all():
            break
    return moved


QueryActivity = tuple[float, int, int]  # the query's held 7-day count, its anchor (ms), 1 when known (_query_activity)
_FEW_COLUMNS = 4  # up to this many columns (the behaviour block), every differing column is looked at
_SMALL_BLOCK = 16  # up to this many values (a view's row or two), :func:`_bins_moved` value by value


def _bins_moved_small(points: SplitPoints | None, columns: Sequence[int], old: np.ndarray,
                      new: np.ndarray) -> np.ndarray:
    """:func:`_bins_moved` of a small block, value by value (:func:`_value_moved`): a dozen numpy calls cost more
    than the few values."""
    moved = np.zeros(len(old), bool)
    for i, (row_old, row_new) in enumerate(zip(old.tolist(), new.tolist(), strict=True)):
        moved[i] = any(_value_moved(points, column, a, b) for column, a, b in zip(columns, row_old, row_new,
                                                                                  strict=True))
    return moved


def _bins(thresholds: np.ndarray, x: np.ndarray) -> np.ndarray:
    """How many thresholds the float32 of each ``x`` is at or above (-1 for NaN, the default side)."""
    bins = np.searchsorted(thresholds, x.astype(np.float32).astype(np.float64), side="right")
    bins[np.isnan(x)] = -1
    return bins


class _AsOfKernel:
    """``kept_rows_as_of`` of the tree evaluator's C library (tree_eval.c): the as-of columns of kept rows and their
    validity in one call, bit for bit :meth:`IncrementalLists._as_of_columns` (tests/test_incremental_lists.py).
    ``kept_rows_as_of_at`` reads the rows of the entry's arrays and writes the matrix in place (no gathers)."""

    def __init__(self, function: Any, points: SplitPoints | None, function_at: Any = None,
                 update_function: Any = None, evaluator: CompiledEvaluator | None = None) -> None:
        self.function = function
        self.function_at = function_at
        self.points = points
        self.taus = np.ascontiguousarray(_TAUS)
        runs = ([points.exact[_ACTIVITY + j] for j in range(len(_TAUS))] + [points.below[_DAYS_SINCE],
                                                                            points.below[_RECENCY]]
                if points is not None else [np.empty(0)] * 5)
        self.thresholds = np.ascontiguousarray(np.concatenate(runs), np.float64)
        self.offsets = np.concatenate([[0], np.cumsum([len(r) for r in runs])]).astype(np.int64)
        self._constants = (self.taus.ctypes.data, self.thresholds.ctypes.data, self.offsets.ctypes.data)
        # kept_rows_update's model table (tree_eval.c): only with split points (a row's validity) and the trees of
        # a plain ranker (no floor, no cascade); the evaluator is held, as the table points into its arrays
        self.update_function = update_function if points is not None and evaluator is not None else None
        self.evaluator = evaluator
        self.n_features = evaluator.arrays.n_features if evaluator is not None else 0
        trees = evaluator.tree_context() if evaluator is not None else ()
        self.bounds = (_leaf_bounds(evaluator.arrays.feature, evaluator.arrays.threshold, evaluator.arrays.depth)
                       if evaluator is not None else np.empty((0, 0, 8), np.float32))
        self.model_table = np.asarray([*self._constants, *trees, self.n_features, _ACTIVITY, _RECENCY, _DEGREE,
                                       self.bounds.ctypes.data], np.int64)
        self._model_address = self.model_table.ctypes.data

    def update(self, e: ListEntry, dirty: np.ndarray, moved: np.ndarray, fresh: np.ndarray, as_of: int,
               k: int, query: QueryActivity) -> tuple[np.ndarray, int] | None:
        """:meth:`IncrementalLists._rescore_and_order` in one call of ``kept_rows_update`` (the same as-of
        arithmetic, the same float32 casts and tree sums, ranking_order's order): (top, rows scored); None when the
        kernel has no trees or the entry's arrays are not laid out for it (the caller then runs the steps)."""
        if self.update_function is None or e.points is not self.points:
            return None
        X = e.features
        a = e.activity
        assert X is not None
        arrays = (a.values, a.anchors, a.known, e.view_latest, e.has_view, X, e.valid_until, e.scores,
                  e.candidates.ids)
        if len(arrays) != len(e.fused_arrays) or not all(map(operator.is_, arrays, e.fused_arrays)):
            n = len(e.scores)
            if (X.shape != (n, self.n_features) or a.values.shape != (n, 3)
                    or not all(array.flags.c_contiguous and array.dtype == dtype and len(array) == n
                               for array, dtype in zip(arrays, _FUSED_DTYPES, strict=True))):
                return None
            e.fused_arrays = arrays
            e.fused_table = np.asarray([array.ctypes.data for array in arrays], np.int64)
        assert e.fused_table is not None
        n = len(e.scores)
        top = np.empty(min(k, n), np.int64)
        flags = (np.ascontiguousarray(dirty, bool), np.ascontiguousarray(moved, bool),
                 np.ascontiguousarray(fresh, bool))
        scored = self.update_function(self._model_address, e.fused_table.ctypes.data, n,
                                      *(flag.ctypes.data for flag in flags), as_of, k, top.ctypes.data, *query)
        if scored < 0:
            raise MemoryError("kept_rows_update: no scratch memory for the leaves")
        return top, int(scored)

    def run(self, e: ListEntry, rows: np.ndarray, as_of: int, points: SplitPoints | None) -> np.ndarray:
        """Writes the as-of columns of ``rows`` at ``as_of`` into the matrix; returns their validity (``as_of``
        without split points, as :meth:`IncrementalLists._validity`)."""
        a = e.activity
        m = len(rows)
        validity = points is not None and points is self.points
        until = np.empty(m, np.int64) if validity else None
        X = e.features
        arrays = (a.values, a.anchors, a.known, e.view_latest, e.has_view)
        if (self.function_at is not None and X.flags.c_contiguous and X.dtype == np.float64
                and all(array.flags.c_contiguous and array.dtype == dtype
                        for array, dtype in zip(arrays, _HELD_DTYPES, strict=True))):
            rows = np.ascontiguousarray(rows, np.int64)
            self.function_at(m, rows.ctypes.data, *(array.ctypes.data for array in arrays), as_of, *self._constants,
                             X.ctypes.data, X.shape[1], _ACTIVITY, _RECENCY,
                             None if until is None else until.ctypes.data)
        else:
            values = np.ascontiguousarray(a.values[rows])
            anchors, known = a.anchors[rows], a.known[rows]
            latest, has_view = e.view_latest[rows], e.has_view[rows]
            block = np.empty((m, 5))
            self.function(m, values.ctypes.data, anchors.ctypes.data, known.ctypes.data, latest.ctypes.data,
                          has_view.ctypes.data, as_of, *self._constants, block.ctypes.data,
                          None if until is None else until.ctypes.data)
            X[rows, _ACTIVITY : _DAYS_SINCE + 1] = block[:, :4]
            X[rows, _RECENCY] = block[:, 4]
        return until if until is not None else np.full(m, as_of, np.int64)


# what the C pass reads: values (n, 3) float64, anchors int64, known bool, latest view int64, has a view bool
_HELD_DTYPES = (np.dtype(np.float64), np.dtype(np.int64), np.dtype(bool), np.dtype(np.int64), np.dtype(bool))


def _leaf_bounds(feature: np.ndarray, threshold: np.ndarray, depth: int) -> np.ndarray:
    """Per tree and leaf (complete trees in heap order, tree_eval.TreeArrays), what the path to the leaf asks of
    the seven as-of columns: (trees, 2^depth, 8) float32, for the four decaying counts (the row's three, the
    query's 7-day) the largest threshold the path goes right of (x >= t; -inf: none), for the three growing ones
    (the row's days since and recency, the query's days since) the smallest it goes left of, negated (-inf: none),
    then a -inf pad: every lane a maximum, 32 bytes a leaf (tree_eval.c path_validity). A row stays in a leaf while
    its counts stay at or above the first and its growing columns below the second. Padding nodes split on column
    0, never an as-of column."""
    falling = (_ACTIVITY, _ACTIVITY + 1, _ACTIVITY + 2, _QUERY_ACTIVITY)
    growing = (_DAYS_SINCE, _RECENCY, _QUERY_DAYS)
    assert 0 not in (*falling, *growing)
    n_trees, n_leaves = len(feature), 1 << depth
    out = np.empty((n_trees, n_leaves, 8), np.float32)
    out[:, :, :4], out[:, :, 4:] = -np.inf, np.inf
    leaves = np.arange(n_leaves)
    node = np.zeros(n_leaves, np.int64)
    for level in range(depth):
        right = ((leaves >> (depth - 1 - level)) & 1).astype(bool)
        on_feature, at = feature[:, node], threshold[:, node]  # (trees, leaves): the node each leaf's path is at
        for j, column in enumerate((*falling, *growing)):
            if j < len(falling):
                hit = (on_feature == column) & right
                out[:, :, j] = np.where(hit, np.maximum(out[:, :, j], at), out[:, :, j])
            else:
                hit = (on_feature == column) & ~right
                out[:, :, j] = np.where(hit, np.minimum(out[:, :, j], at), out[:, :, j])
        node = 2 * node + 1 + right
    out[:, :, 4:7] = -out[:, :, 4:7]
    out[:, :, 7] = -np.inf
    return np.ascontiguousarray(out)


# what kept_rows_update reads besides them: the matrix float64, valid_until int64, scores float64, ids int64
_FUSED_DTYPES = (*_HELD_DTYPES, np.dtype(np.float64), np.dtype(np.int64), np.dtype(np.float64), np.dtype(np.int64))
_KERNELS: dict[str, _AsOfKernel | None] = {}


def _as_of_kernel(scorer: Scorer, points: SplitPoints | None) -> _AsOfKernel | None:
    """The compiled as-of columns for a :class:`~pymk.ranking.model.Ranker` served by the compiled evaluator (by
    model version); None otherwise (numpy and math.exp then, the same bits)."""
    from pymk.ranking.model import Ranker

    version = scorer.version
    if version not in _KERNELS:
        kernel = None
        if type(scorer) is Ranker:
            compiled = scorer._evaluator_or_none()  # noqa: SLF001 - the evaluator the ranker serves with
            if compiled is not None:
                plain = scorer.floor is None and scorer.prefilter is None
                kernel = _AsOfKernel(compiled.library.kept_rows_as_of, points,
                                     getattr(compiled.library, "kept_rows_as_of_at", None),
                                     getattr(compiled.library, "kept_rows_update", None),
                                     compiled if plain else None)
        _KERNELS[version] = kernel
    return _KERNELS[version]


# ---- the cache ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PackedMatrix:
    """A kept feature matrix at rest, bit for bit and in fewer bytes: a column whose every value has the same bits is
    held once (the query-level columns, the structure columns a ranker without them leaves at 0), a column whose
    every value survives float64 → float32 → float64 with its bits (counts, flags, the float32 cosine) as float32,
    the others as float64. Decided per column by comparing bits, so :meth:`unpack` gives back the very matrix."""

    shape: tuple[int, int]
    constant: np.ndarray  # column indices
    constant_values: np.ndarray  # (len(constant),) float64
    narrow: np.ndarray
    narrow_values: np.ndarray  # (n, len(narrow)) float32
    wide: np.ndarray
    wide_values: np.ndarray  # (n, len(wide)) float64

    @classmethod
    def of(cls, X: np.ndarray) -> PackedMatrix:
        n, m = X.shape
        if n == 0:
            none = np.empty(0, np.int64)
            return cls((n, m), none, np.empty(0), none, np.empty((0, 0), np.float32), none, np.empty((0, 0)))
        bits = X.view(np.int64)
        same = (bits == bits[0]).all(axis=0)
        narrow_all = X.astype(np.float32)
        exact32 = (narrow_all.astype(np.float64).view(np.int64) == bits).all(axis=0)
        constant = np.flatnonzero(same)
        narrow = np.flatnonzero(~same & exact32)
        wide = np.flatnonzero(~same & ~exact32)
        return cls((n, m), constant, X[0, constant].copy(), narrow, np.ascontiguousarray(narrow_all[:, narrow]), wide,
                   np.ascontiguousarray(X[:, wide]))

    def unpack(self) -> np.ndarray:
        out = np.empty(self.shape)
        if self.shape[0]:
            out[:, self.constant] = self.constant_values
            out[:, self.narrow] = self.narrow_values
            out[:, self.wide] = self.wide_values
        return out

    @property
    def nbytes(self) -> int:
        return (self.constant_values.nbytes + self.narrow_values.nbytes + self.wide_values.nbytes
                + 8 * (len(self.constant) + len(self.narrow) + len(self.wide)))


@dataclass
class ListEntry:
    """One user's kept list (see the module doc). Per-row arrays are in the candidates' row order."""

    user: int
    key: tuple[Any, ...]  # (model version, candidate config, k): another one means a full build
    built_as_of: int
    built_at: int  # wall clock (ms) of the full build: the age bound's clock
    as_of: int  # of the last update
    candidates: CandidateSet
    # (n, N_FEATURES) while an update works on it, else None and ``packed`` holds it; the as-of columns of a row not
    # re-scored are as of an older time
    features: np.ndarray | None
    scores: np.ndarray  # (n,) float64
    valid_until: np.ndarray  # (n,) int64: the row's score stands for as-of times below this (see validity_due)
    activity: ActivityTable  # the candidates' held activity, as last read
    view_latest: np.ndarray  # (n,) int64, latest view either way (0 without)
    has_view: np.ndarray  # (n,) bool
    query_profile: Any
    query_embedding: np.ndarray | None
    query_bins: tuple[float, float]  # bins (or values, without split points) of the query as-of columns
    excluded: frozenset[int]
    popular: tuple[int, ...]
    ann_full: bool  # ANN filled its ann_k slots: dropping one of its rows brings the next one in
    graph_cut: bool  # the 2-hop set may be larger than graph_k
    rough_cut: bool  # the rough cut to max_candidates dropped rows
    # the ANN answer for ann_k + ANN_SPARES, best first, asked when an ANN row first drops (empty: not asked)
    ann_ids: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    ann_cos: np.ndarray = field(default_factory=lambda: np.empty(0))
    updates: int = 0
    graph_changed: bool = False  # an own connection change since the last update
    views_changed: bool = False  # a view either way since the last update
    invalid: str | None = None  # a reason for a full build, set from outside (invalidate)
    nbytes: int = 0
    new_rows: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # of this update, scored at as-of
    # ChangeStampSource: the source's stamp when the rows were last read (-1: the source has none), and the user's
    # behaviour stamp then; without them every update re-reads every row
    stamp: int = -1
    ann_stamp: int = -1  # AnnStampSource's stamp when the ANN answer was last asked (-1: the source has none)
    views_stamp: int = -1
    engagement_stamp: int = -1
    query_degree: int = -1  # the user's degree the graph columns were computed with
    # the users whose place at the graph cut their degrees decided, and those degrees (a move: a full build)
    graph_tie_ids: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    graph_tie_degrees: np.ndarray = field(default_factory=lambda: np.empty(0))
    id_order: np.ndarray | None = None  # np.argsort(candidates.ids), kept while the rows do not change
    kernel: _AsOfKernel | None = None  # the compiled as-of columns, when the scorer's C library is loaded
    points: SplitPoints | None = None  # the scorer's split points (the entry's key holds its version)
    maps: tuple[int, int, Mapping[int, Any], Mapping[int, int]] | None = None  # see _held_maps
    # ItemEngagementSource: the engagers of each of the user's items the held co-engagements were counted from (see
    # _engaged_delta), read with them
    item_engagers: dict[int, frozenset[int]] | None = None
    handles: np.ndarray | None = None  # the source's stamp handles of the rows, kept while the rows do not change
    packed: PackedMatrix | None = None  # the feature matrix at rest (between updates)
    # valid_until not computed yet: a build leaves it to the first update, as most kept lists of a busy stream are
    # built anew before one (changed_rows) and it is a pass over every row
    validity_due: bool = False
    # a scorer with a cascade (ranking/cascade.py): every row's pre-ranker margin, and its full model score where
    # computed (NaN: not passed since its features last moved); ``scores`` is then their composition
    pre: np.ndarray | None = None
    full: np.ndarray | None = None
    # the query's held activity the rows' validity counts on (_query_activity; another one re-scores every row),
    # and the as-of time before which its two columns keep their side of every threshold (_query_until)
    query_activity: QueryActivity | None = None
    query_until: int = _NEVER
    # the arrays _AsOfKernel.update reads and their addresses (int64), kept while they are the same objects
    fused_arrays: tuple[np.ndarray, ...] = ()
    fused_table: np.ndarray | None = None

    def pack(self) -> None:
        """The matrix to its packed form (under memory pressure; an update unpacks it)."""
        if self.features is not None:
            self.packed = PackedMatrix.of(self.features)
            self.features = None
            # the C call's table holds the matrix too: let it go (the next update takes the addresses anew)
            self.fused_arrays, self.fused_table = (), None

    def unpack(self) -> np.ndarray:
        """The full matrix, to work on (the entry holds it until :meth:`pack`)."""
        if self.features is None:
            assert self.packed is not None
            self.features = self.packed.unpack()
            self.packed = None
        return self.features

    def measure(self) -> int:
        c = self.candidates
        arrays = (c.ids, c.common_neighbor_count, c.adamic_adar_score, c.ann_score, c.from_graph, c.from_ann,
                  self.scores, self.valid_until, self.activity.values, self.activity.anchors,
                  self.activity.known, self.view_latest, self.has_view)
        total = sum(a.nbytes for a in arrays) + (0 if c.from_popular is None else c.from_popular.nbytes)
        total += self.features.nbytes if self.features is not None else 0
        total += self.packed.nbytes if self.packed is not None else 0
        total += self.graph_tie_ids.nbytes + self.graph_tie_degrees.nbytes
        total += len(self.scores) * 16  # id_order and handles, kept once asked (int64 a row each)
        total += sum(a.nbytes for a in (self.pre, self.full) if a is not None)
        if self.maps is not None:  # the user's views and co-engagements (~100 B an entry in a dict)
            total += 100 * (len(self.maps[2]) + len(self.maps[3]))
        if self.item_engagers is not None:  # their items' engagers (~60 B an int in a set)
            total += sum(60 * len(engagers) + 200 for engagers in self.item_engagers.values())
        # the exclusion set and popular list (~60 B an int in a set), the fixed part
        self.nbytes = total + 60 * len(self.excluded) + 40 * len(self.popular) + 2048
        return self.nbytes


@dataclass
class ListCacheStats:
    hits: int = 0  # lists served by an incremental update
    misses: int = 0  # lists with no entry
    full_builds: dict[str, int] = field(default_factory=dict)  # full Stage 1 runs by reason (miss included)
    evictions: int = 0
    packs: int = 0  # feature matrices packed under memory pressure (PackedMatrix)
    rows_rescored: int = 0  # rows predicted again by incremental updates
    rows_kept: int = 0  # rows whose score stood
    shadow_checked: int = 0
    shadow_equal: int = 0  # top k equal, ids in order
    shadow_scores_equal: int = 0  # and every top-k score bit for bit
    seconds_incremental: float = 0.0
    seconds_full: float = 0.0
    seconds_shadow: float = 0.0


@dataclass(frozen=True)
class ListCacheConfig:
    max_bytes: int = 256 * 2**20
    max_age_ms: int = 300_000  # as-of time since the last full Stage 1
    max_updates: int = 64  # incremental updates since the last full Stage 1
    shadow_fraction: float = 0.02
    # a full Stage 1 instead of an update when the change stamps name more than this share of the rows (their
    # degree, activity, embedding or profile moved): the update would re-read them all and compare their bins, and
    # costs more than a build (the worker at 200 events/s: 7.9 ms an update against 6.4 a build)
    max_changed_share: float = 0.5


def shadow_sampled(user: int, as_of_ms: int, fraction: float) -> bool:
    """Whether the list of ``user`` at ``as_of_ms`` is shadow-checked: a hash of both, so a redone flush checks
    the same lists."""
    if fraction <= 0:
        return False
    if fraction >= 1:
        return True
    z = ((user & _MASK) * _MIX ^ (as_of_ms & _MASK)) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK  # splitmix64's finaliser
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    z ^= z >> 31
    return z / 2.0**64 < fraction


class IncrementalLists:
    """A worker's kept lists, LRU by bytes (see the module doc). :meth:`score` is the one entry point: the
    user's :class:`ScoredCandidates` at ``as_of_ms``, by an incremental update when the entry allows it, else by
    the full path (:func:`score_candidates`), whose result is then kept."""

    def __init__(self, config: ListCacheConfig | None = None) -> None:
        self.config = config or ListCacheConfig()
        self.entries: OrderedDict[int, ListEntry] = OrderedDict()
        self._unpacked: OrderedDict[int, None] = OrderedDict()  # the entries whose matrix is not packed, LRU first
        self.bytes = 0
        self.stats = ListCacheStats()
        self.last_path = ""  # "incremental" or "full:<reason>" of the last score() (benches, logs)

    # ---- what the owner tells ---------------------------------------------------------------------------------
    def mark_graph_changed(self, users: Iterable[int]) -> None:
        """These users' own connections changed: their next update re-reads their 2-hop maps."""
        for user in users:
            entry = self.entries.get(user)
            if entry is not None:
                entry.graph_changed = True

    def mark_views_changed(self, users: Iterable[int]) -> None:
        """These users viewed or were viewed: their next update re-reads their views (co-engagements are re-read
        at every update: another user's engagement changes them without touching this user)."""
        for user in users:
            entry = self.entries.get(user)
            if entry is not None:
                entry.views_changed = True

    def invalidate(self, users: Iterable[int], reason: str = "invalidated") -> None:
        """These users' next lists take a full Stage 1 (their 2-hop set changed through someone else's
        connection, their profile changed, a forced refresh)."""
        for user in users:
            entry = self.entries.get(user)
            if entry is not None:
                entry.invalid = reason

    def clear(self) -> None:
        self.entries.clear()
        self._unpacked.clear()
        self.bytes = 0

    def describe(self) -> dict[str, Any]:
        s = self.stats
        return {"bytes": self.bytes, "max_bytes": self.config.max_bytes, "entries": len(self.entries),
                "bytes_per_entry": round(self.bytes / len(self.entries)) if self.entries else None,
                "packed_entries": len(self.entries) - len(self._unpacked), "packs": s.packs,
                "hits": s.hits, "misses": s.misses, "evictions": s.evictions,
                "full_builds": dict(sorted(s.full_builds.items())),
                "hit_share": round(s.hits / (s.hits + sum(s.full_builds.values())), 4)
                if s.hits + sum(s.full_builds.values()) else None,
                "rows_rescored": s.rows_rescored, "rows_kept": s.rows_kept,
                "ms_per_incremental_list": round(1000 * s.seconds_incremental / s.hits, 3) if s.hits else None,
                "ms_per_full_list": (round(1000 * s.seconds_full / sum(s.full_builds.values()), 3)
                                     if s.full_builds else None),
                "max_age_ms": self.config.max_age_ms, "max_updates": self.config.max_updates}

    def describe_shadow(self) -> dict[str, Any]:
        s = self.stats
        return {"fraction": self.config.shadow_fraction, "checked": s.shadow_checked, "equal": s.shadow_equal,
                "equal_share": round(s.shadow_equal / s.shadow_checked, 4) if s.shadow_checked else None,
                "scores_bit_equal": s.shadow_scores_equal, "seconds": round(s.seconds_shadow, 3)}

    # ---- the entry point ----------------------------------------------------------------------------------------
    def score(self, user: int, source: RankingSource, scorer: Scorer, config: CandidateConfig, as_of_ms: int,
              k: int, builder: FeatureBuilder, exact_features: bool = False,
              now_ms: int | None = None) -> ScoredCandidates:
        """``user``'s scored candidates at ``as_of_ms``: equal to :func:`score_candidates` (same rows in the same
        order, same scores bit for bit, same top k) in every case the update handles, the full path otherwise.
        The top k rows' features are exact; the other rows' as-of columns only with ``exact_features``. After an
        update the features are the kept matrix, read-only and valid until the user's next list (copy to keep them).
        ``now_ms``: the wall clock, for the age bound (what reaches a kept list late does so in wall time; a
        replay's event time may run hours a second); the as-of time when not given."""
        started = time.perf_counter()
        key = (scorer.version, config, k)
        entry = self.entries.get(user)
        now = as_of_ms if now_ms is None else now_ms
        reason = self._full_reason(entry, user, source, key, as_of_ms, now)
        scored: ScoredCandidates | None = None
        if reason is None:
            assert entry is not None
            self.entries.move_to_end(user)
            entry.unpack()
            self._unpacked[user] = None
            self._unpacked.move_to_end(user)
            try:
                result = self._update(entry, source, scorer, config, as_of_ms, k, builder)
            except BaseException:
                # an update stopped part way (e.g. SourceNotReady from the ANN) leaves a half-updated entry: gone,
                # so the user's next list is a full build
                self._drop(user)
                raise
            if isinstance(result, str):
                reason = result
            else:
                if exact_features:
                    self._bring_to(entry, np.arange(len(entry.scores)), as_of_ms)
                assert entry.features is not None
                # the kept matrix itself, read-only, not a copy (~0.35 MB a 1,000-row list): it is the caller's until
                # this user's next update writes the entry (a pack below drops the entry's reference, not the array)
                features = entry.features.view()
                features.flags.writeable = False
                self._remeasure(entry)  # rows may have come and gone; past the budget, others are packed
                spent = time.perf_counter() - started
                scored = ScoredCandidates(entry.candidates, features, entry.scores.copy(), result,
                                          {"incremental": spent * 1e3},
                                          None if entry.pre is None else entry.pre.copy())
        if scored is None:
            assert reason is not None
            self.stats.full_builds[reason] = self.stats.full_builds.get(reason, 0) + 1
            self.stats.misses += reason == "miss"
            scored = self._build(user, source, scorer, config, as_of_ms, k, builder, key, now)
            self.last_path = f"full:{reason}"
            self.stats.seconds_full += time.perf_counter() - started
            return scored
        self.stats.hits += 1
        self.last_path = "incremental"
        self.stats.seconds_incremental += time.perf_counter() - started
        if shadow_sampled(user, as_of_ms, self.config.shadow_fraction):
            scored = self._shadow(user, scored, source, scorer, config, as_of_ms, k, builder, key, now)
        return scored

    def exact_features(self, user: int, scored: ScoredCandidates, as_of_ms: int,
                       rows: Sequence[int] | np.ndarray | None = None) -> ScoredCandidates:
        """``scored`` (the last :meth:`score` of ``user``) with the as-of columns of ``rows`` (default: every row)
        at ``as_of_ms`` — the rows a caller logs beyond the top k (the worker's sample of unshown candidates)."""
        entry = self.entries.get(user)
        if entry is None or self.last_path != "incremental" or entry.as_of != as_of_ms:
            return scored  # a full build's matrix is exact
        # on a copy of the served matrix: the kept one (maybe packed since) stays as it is (these rows' scores
        # stand, their bins unchanged)
        features = scored.features.copy()
        held = entry.features, entry.packed
        entry.features, entry.packed = features, None
        try:
            self._bring_to(entry, np.arange(len(entry.scores)) if rows is None else np.asarray(rows, np.int64),
                           as_of_ms)
        finally:
            entry.features, entry.packed = held
        return replace(scored, features=features)

    def _shadow(self, user: int, scored: ScoredCandidates, source: RankingSource, scorer: Scorer,
                config: CandidateConfig, as_of_ms: int, k: int, builder: FeatureBuilder,
                key: tuple[Any, ...], now: int) -> ScoredCandidates:
        """The full path for the same list; counts whether the top k agrees. A disagreement serves the full list
        and keeps it (the entry was wrong)."""
        started = time.perf_counter()
        full = score_candidates(user, source, scorer, config, as_of_ms, k, builder=builder)
        ids, full_ids = scored.candidates.ids[scored.top], full.candidates.ids[full.top]
        equal = bool(np.array_equal(ids, full_ids))
        self.stats.shadow_checked += 1
        self.stats.shadow_equal += equal
        self.stats.shadow_scores_equal += equal and bool(np.array_equal(scored.scores[scored.top],
                                                                        full.scores[full.top]))
        if not equal:
            log.warning("incremental list of user %d at %d differs from the full one: %s != %s", user, as_of_ms,
                        ids.tolist(), full_ids.tolist())
            self._keep(self._entry_of(user, full, source, scorer, as_of_ms, key, now))
            scored = full
        self.stats.seconds_shadow += time.perf_counter() - started
        return scored

    # ---- full builds ------------------------------------------------------------------------------------------------
    def _full_reason(self, entry: ListEntry | None, user: int, source: RankingSource, key: tuple[Any, ...],
                     as_of_ms: int, now_ms: int) -> str | None:
        if entry is None:
            return "miss"
        if entry.invalid is not None:
            return entry.invalid
        if entry.key != key:
            return "model"
        if as_of_ms < entry.as_of:
            return "as_of_back"
        if now_ms - entry.built_at > self.config.max_age_ms:
            return "age"
        if entry.updates >= self.config.max_updates:
            return "updates"
        if not _incremental_source(source):
            return "source"
        profile = source.profile(user)
        if profile is not entry.query_profile and profile != entry.query_profile:
            return "query_profile"
        return None

    def _build(self, user: int, source: RankingSource, scorer: Scorer, config: CandidateConfig, as_of_ms: int,
               k: int, builder: FeatureBuilder, key: tuple[Any, ...], now: int) -> ScoredCandidates:
        scored = score_candidates(user, source, scorer, config, as_of_ms, k, builder=builder)
        if _incremental_source(source):
            self._keep(self._entry_of(user, scored, source, scorer, as_of_ms, key, now))
        else:
            self._drop(user)
        return scored

    def _entry_of(self, user: int, scored: ScoredCandidates, source: RankingSource, scorer: Scorer,
                  as_of_ms: int, key: tuple[Any, ...], now_ms: int | None = None) -> ListEntry:
        config: CandidateConfig = key[1]
        c = scored.candidates
        ids = c.ids
        id_list = ids.tolist()
        excluded = _excluded(user, source, config, as_of_ms)
        vector = source.embedding(user)
        stats = c.stats
        _, latest, has_view = view_columns(user, ids, source)
        entry = ListEntry(
            user=user, key=key, built_as_of=as_of_ms, built_at=as_of_ms if now_ms is None else now_ms,
            as_of=as_of_ms, candidates=c,
            features=scored.features.copy(), scores=scored.scores.copy(),
            valid_until=np.zeros(len(ids), np.int64),
            activity=activity_table_for(source, ids, id_list), view_latest=latest, has_view=has_view,
            query_profile=source.profile(user),
            query_embedding=None if vector is None else np.array(vector, np.float32),
            query_bins=(math.nan, math.nan), excluded=excluded,
            popular=_popular(user, source, config, as_of_ms, excluded),
            ann_full=config.ann_k > 0 and stats.get("ann", 0) >= config.ann_k,
            graph_cut=config.graph_k <= stats.get("graph", 0),
            rough_cut=stats.get("merged", 0) - stats.get("filtered", 0) > len(ids))
        prefilter: Prefilter | None = getattr(scorer, "prefilter", None)
        if prefilter is not None:  # which rows hold a full score: those the cascade passed (all, for a short list)
            entry.pre = (scored.prefilter_margins.copy() if scored.prefilter_margins is not None
                         else prefilter.margin(entry.features))
            entry.full = np.full(len(ids), np.nan)
            passed = (passed_rows(entry.pre, ids, prefilter.candidates) if scored.prefilter_margins is not None
                      else np.arange(len(ids)))
            entry.full[passed] = entry.scores[passed]
        points = split_points(scorer, entry.features.shape[1])
        entry.kernel = _as_of_kernel(scorer, points)
        entry.points = points
        entry.validity_due = True  # valid_until at as_of_ms, computed by the first update (_update)
        entry.query_bins = _query_bins(entry.features, points)
        entry.query_activity = _query_activity(user, source)
        entry.query_degree = source.degree(user)
        if c.graph_ties is not None and len(c.graph_ties):
            entry.graph_tie_ids = c.graph_ties
            entry.graph_tie_degrees = candidate_degrees(c.graph_ties, c.graph_ties.tolist(), source)
        if implements(source, AnnStampSource):
            entry.ann_stamp = source.ann_stamp()
        if implements(source, ChangeStampSource):
            entry.stamp = source.change_stamp()
            entry.views_stamp, entry.engagement_stamp = source.views_stamp(user), source.co_engagement_stamp(user)
        return entry

    # ---- the update ---------------------------------------------------------------------------------------------
    def _update(self, e: ListEntry, source: RankingSource, scorer: Scorer, config: CandidateConfig, as_of: int,
                k: int, builder: FeatureBuilder) -> np.ndarray | str:
        """The update of the module doc: the top k rows, or the reason it cannot be exact (the entry may then be
        half updated: the caller replaces it by a full build)."""
        user = e.user
        held_before = e.maps  # the maps the kept rows' behaviour columns come from (_add_rows may move e.maps)
        excluded = _excluded(user, source, config, as_of)
        if not excluded >= e.excluded:
            return "unexcluded"
        # a tie at the graph cut is broken by degree: a tied user's degree move may swap who is in (the 2-hop maps
        # did not change, so nothing else would tell)
        ties = e.graph_tie_ids
        if len(ties) and not np.array_equal(candidate_degrees(ties, ties.tolist(), source), e.graph_tie_degrees):
            return "graph_tie"
        c = e.candidates
        moved_parts = _moved_parts(e, source)  # kept for the reads below while the source's stamp holds
        if self.config.max_changed_share < 1.0 and _changed_share(moved_parts) > self.config.max_changed_share:
            return "changed_rows"
        query = _query_activity(user, source)
        if e.validity_due:  # as the build would have: every row, at the entry's as-of time (nothing moved it yet)
            assert e.features is not None and e.query_activity is not None
            e.query_until = _query_until(e.query_activity, e.points, e.as_of)
            e.valid_until = self._fresh_validity(e, np.arange(len(e.scores)), e.points, e.as_of)
            e.validity_due = False
        # a list's second update: with kept_rows_update every row is re-scored, for its paths' validity (the bound
        # over every threshold, the query's included, would re-score most rows over the next updates, some twice);
        # not at the first: most kept lists of a busy stream are built anew before a second update
        rescore_every_row = e.updates == 1 and e.kernel is not None and e.kernel.update_function is not None
        # the query's own activity moved (an own connection): every row re-scores below; else the rows' validity
        # covers its two columns (they move with time alone)
        query_moved_activity = query != e.query_activity
        # the same held activity before its bound keeps the bins it had at the entry's as-of time: the same bound
        if query_moved_activity or not e.as_of <= as_of < e.query_until:
            e.query_activity, e.query_until = query, _query_until(query, e.points, as_of)
        popular = _popular(user, source, config, as_of, excluded)
        vector = source.embedding(user)
        vector = None if vector is None else np.asarray(vector, np.float32)
        query_moved = (vector is None) != (e.query_embedding is None) or (
            vector is not None and not np.array_equal(vector, e.query_embedding))
        # some embedding moved since the ANN answer was asked (AnnStampSource): asked again, and when it differs
        # from the kept ANN rows it changes them in place as a moved own embedding does
        ann_stamp = source.ann_stamp() if implements(source, AnnStampSource) else -1
        answer: list[tuple[int, float]] | None = None
        if query_moved or (config.ann_k and ann_stamp >= 0 and ann_stamp != e.ann_stamp):
            answer = list(source.ann_neighbours(user, config.ann_k, excluded))[: config.ann_k] if config.ann_k else []
        ann_moved = query_moved or (answer is not None and not _same_ann(answer, c))
        if (popular != e.popular or ann_moved) and (e.graph_cut or e.rough_cut):
            # a new popular or ANN user may be a 2-hop user below the cut, or fall to the rough cut
            return ("popular" if popular != e.popular else "query_embedding" if query_moved else "ann_moved")
        if answer is not None:  # the spares kept past ann_k were asked of the index as it was
            e.ann_ids, e.ann_cos = np.empty(0, np.int64), np.empty(0)
        e.ann_stamp = ann_stamp
        newly = excluded - e.excluded
        chosen_under = e.excluded  # the exclusions the kept ANN rows were chosen under (the spares are asked so)
        # held for the next update's "unexcluded" check: a user this update excludes (a connection, a dismissal)
        # and a later one lets back in (the connection removed, the dismissal expired) must come back
        e.excluded = excluded
        keep = (~ids_in(c.ids, np.fromiter(newly, np.int64, len(newly))) if newly
                else np.ones(len(c.ids), bool))
        dropped = ~keep
        ann_new: dict[int, float] | None = None  # the ANN answer now, when it moved
        if ann_moved:  # the user's own embedding, or others', moved: the ANN answer asked again
            assert answer is not None
            ann_new = {int(u): float(x) for u, x in answer}
            e.ann_full = config.ann_k > 0 and len(answer) >= config.ann_k
            e.ann_ids, e.ann_cos = np.empty(0, np.int64), np.empty(0)
            if query_moved:
                e.query_embedding = None if vector is None else vector.copy()
        promoted: list[tuple[int, float]] = []  # ANN neighbours that come in for dropped ANN rows
        if dropped.any() and ann_new is None:
            if e.graph_cut and (dropped & c.from_graph).any():
                return "graph_cut"
            if e.rough_cut:
                return "rough_cut"
            if e.ann_full and (dropped & c.from_ann).any():
                if not len(e.ann_ids):  # asked once, when first needed (an ANN search of ann_k + spares)
                    e.ann_ids, e.ann_cos = _ann_spares(user, source, config, chosen_under, c)
                    if not len(e.ann_ids):
                        e.ann_ids = np.full(1, -1, np.int64)  # none to be had: not asked again
                        e.ann_cos = np.zeros(1)
                # the full path asks ann_k neighbours not excluded: the first ann_k of the kept answer
                allowed = ~ids_in(e.ann_ids, np.fromiter(excluded, np.int64, len(excluded)))
                if int(allowed.sum()) < config.ann_k:
                    return "ann_fill"
                answer = np.flatnonzero(allowed)[: config.ann_k]
                held = c.ids[c.from_ann & keep]
                fresh_ann = answer[~ids_in(e.ann_ids[answer], held)]
                promoted = list(zip(e.ann_ids[fresh_ann].tolist(), e.ann_cos[fresh_ann].tolist(), strict=True))
                if promoted and e.graph_cut:
                    return "graph_cut"  # a promoted user may be a 2-hop user below the cut
                if promoted:
                    kept = c.from_ann & keep
                    ann_new = dict(zip(c.ids[kept].tolist(), c.ann_score[kept].tolist(), strict=True))
                    ann_new.update(promoted)
        elif dropped.any() and (e.graph_cut and (dropped & c.from_graph).any() or e.rough_cut):
            return "graph_cut" if e.graph_cut else "rough_cut"
        extras: list[int] = []  # ANN or popular users that are not rows yet (CN and AA 0: not 2-hop users)
        if ann_new is not None or popular != e.popular:
            from_ann, ann_score = c.from_ann, c.ann_score
            popular_ids = np.asarray(popular, np.int64)
            if ann_new is not None:
                ids_now = c.ids.tolist()
                from_ann = np.fromiter(map(ann_new.__contains__, ids_now), bool, len(ids_now))
                ann_score = np.fromiter(map(ann_new.get, ids_now, repeat(math.nan)), np.float64, len(ids_now))
                held_ids = set(ids_now)
                extras = [u for u in dict.fromkeys([*ann_new, *popular]) if u not in held_ids]
            else:
                extras = popular_ids[~ids_in(popular_ids, c.ids)].tolist()
            from_popular = ids_in(c.ids, popular_ids)
            if not e.graph_changed:  # else the 2-hop maps decide below which rows still have a source
                keep &= c.from_graph | from_ann | from_popular
            e.candidates = c = replace(c, from_ann=from_ann, ann_score=ann_score, from_popular=from_popular)
            e.popular = popular
        graph_changed = e.graph_changed
        hop_ids = hop_counts = hop_aa = np.empty(0)
        added = np.empty(0, np.int64)
        e.new_rows = np.empty(0, np.int64)
        if graph_changed:
            if e.graph_cut or e.rough_cut:
                return "graph_cut" if e.graph_cut else "rough_cut"
            hop_ids, hop_counts, hop_aa = two_hop_by_id(user, source)  # by id, as Stage 1 reads them
            excluded_ids = np.fromiter(excluded, np.int64, len(excluded))
            pool = hop_ids[~ids_in(hop_ids, excluded_ids)] if len(excluded_ids) else hop_ids
            if len(pool) > config.graph_k:
                return "graph_cut"
            in_pool = ids_in(c.ids, pool, wanted_sorted=True) & keep
            # a row that left the 2-hop set stays only for its other sources
            keep &= in_pool | c.from_ann | (c.from_popular if c.from_popular is not None else False)
            added = pool[~ids_in(pool, c.ids)]
        if len(c.ids) - int((~keep).sum()) + len(added) + len(extras) > config.max_candidates:
            return "rough_cut"
        # the rows kept: gathered by the reorder when one follows (one pass over the arrays), else here
        kept_rows: np.ndarray | None = None
        if not keep.all():
            if graph_changed or ann_new is not None or extras:
                kept_rows = np.flatnonzero(keep)
            else:
                self._keep_rows(e, np.flatnonzero(keep))
        rows_before_added = len(e.candidates.ids)
        cosine = ann_new or {}
        in_popular = set(popular) if extras or graph_changed else frozenset()
        if extras and not graph_changed:
            m = len(extras)
            self._add_rows(e, CandidateSet(user, np.asarray(extras, np.int64), np.zeros(m, np.int64), np.zeros(m),
                                           np.fromiter(map(cosine.get, extras, repeat(math.nan)), np.float64, m),
                                           np.zeros(m, bool), np.fromiter(map(cosine.__contains__, extras), bool, m),
                                           {}, np.fromiter(map(in_popular.__contains__, extras), bool, m)),
                           user, source, builder, as_of)
        if (ann_new is not None or extras) and not graph_changed:
            self._reorder(e, kept_rows, rows_before_added)
        if graph_changed:
            c = e.candidates
            e.candidates = replace(c, common_neighbor_count=lookup_by_id(hop_ids, hop_counts, c.ids, 0),
                                   adamic_adar_score=lookup_by_id(hop_ids, hop_aa, c.ids, 0.0),
                                   from_graph=ids_in(c.ids, hop_ids, wanted_sorted=True))
            # the new 2-hop users and the ANN or popular users that are not rows yet, in one batch of new rows
            fresh_ids = np.concatenate([added, np.asarray(extras, np.int64)])
            fresh_ids = fresh_ids[np.sort(np.unique(fresh_ids, return_index=True)[1])]
            if len(fresh_ids):
                m = len(fresh_ids)
                listed = fresh_ids.tolist()
                self._add_rows(e, CandidateSet(user, fresh_ids, lookup_by_id(hop_ids, hop_counts, fresh_ids, 0),
                                               lookup_by_id(hop_ids, hop_aa, fresh_ids, 0.0),
                                               np.fromiter(map(cosine.get, listed, repeat(math.nan)), np.float64, m),
                                               ids_in(fresh_ids, hop_ids, wanted_sorted=True),
                                               np.fromiter(map(cosine.__contains__, listed), bool, m), {},
                                               np.fromiter(map(in_popular.__contains__, listed), bool, m)),
                               user, source, builder, as_of, graph_later=True)
            self._reorder(e, kept_rows, rows_before_added)
        c = e.candidates
        n = len(c.ids)
        ids = c.ids
        X = e.features
        points = e.points
        fresh = np.zeros(n, bool)  # rows whose as-of columns are as of now and whose score is exact (new rows)
        fresh[e.new_rows] = True
        dirty = fresh.copy()  # new rows are scored with the rest
        everything = np.arange(n)

        # the query-level as-of columns: the same for every row; a bin change re-scores every row (then the other
        # columns' bins need no comparing)
        query_activity, query_days = _query_columns(query, as_of)
        X[:, _QUERY_ACTIVITY] = query_activity
        X[:, _QUERY_DAYS] = query_days
        if points is None:  # no validity: a move re-scores every row
            bins = _query_bins(X, points)
            if not _same_bins(bins, e.query_bins):
                dirty[:] = True
            e.query_bins = bins
        elif query_moved_activity or rescore_every_row:
            dirty[:] = True

        def refresh(groups: list[str], rows: np.ndarray) -> None:
            """Recompute ``groups`` for ``rows`` into X; a row whose new values left a bin of the model is dirty."""
            if not len(rows):
                return
            whole = len(rows) == n
            if whole and dirty.all():  # no bins to compare: straight into the matrix (the groups write only theirs)
                builder.columns(user, c, source, as_of, groups, X)
                return
            scratch = np.empty((len(rows), X.shape[1]))
            builder.columns(user, c if whole else c.subset(rows), source, as_of, groups, scratch)
            columns = [column for group in groups for column in COLUMN_GROUPS[group]]
            block_new = scratch[:, columns]
            if not dirty.all():
                block_old = X[:, columns] if whole else X[np.ix_(rows, columns)]
                dirty[rows[_bins_moved(points, columns, block_old, block_new)]] = True
            if whole:
                X[:, columns] = block_new
            else:
                X[np.ix_(rows, columns)] = block_new

        # Which rows' per-user reads may have moved: with change stamps the rows whose degree or activity
        # (``read``), embedding or profile changed since the last read; without, every row (and the profile columns
        # are not re-read: module doc).
        stamped = implements(source, ChangeStampSource) and e.stamp >= 0
        stamp_now = source.change_stamp() if stamped else -1
        none = np.empty(0, np.int64)
        if not stamped:
            read = read_embedding = everything
            read_profile = none
        elif stamp_now == e.stamp:
            read = read_embedding = read_profile = none
        else:
            if e.handles is None:
                e.handles = source.stamp_handles(ids)
            handles, unread = e.handles, ~fresh
            held_parts = (moved_parts[2:] if moved_parts is not None and moved_parts[0] == stamp_now
                          and moved_parts[1] is handles else
                          [source.changed_since(handles, e.stamp, part) for part in ("graph", "embedding", "profile")])
            read, read_embedding, read_profile = (np.flatnonzero(moved & unread) for moved in held_parts)
        query_degree = source.degree(user)
        all_graph = graph_changed or query_degree != e.query_degree or not stamped
        refresh(["graph"] + (["resource_allocation"] if graph_changed else []), everything if all_graph else read)
        refresh(["embedding"], everything if query_moved else read_embedding)
        refresh(["profile"], read_profile)
        e.query_degree = query_degree

        # the behavioural columns: the views when the user viewed or was viewed (or, with stamps, when the stamp
        # says so), the co-engagements (another user's engagement moves them without touching this user) at every
        # update without stamps, else when the user's co-engagement stamp moved
        views_stamp = source.views_stamp(user) if stamped else -1
        engagement_stamp = source.co_engagement_stamp(user) if stamped else -1
        if stamped:
            views_due = e.views_changed or views_stamp != e.views_stamp
            engagements_due = engagement_stamp != e.engagement_stamp
        else:
            views_due, engagements_due = bool(e.views_changed or len(e.new_rows) or graph_changed), True
        view_moved = np.zeros(n, bool)
        if views_due or engagements_due:
            if e.id_order is None:
                e.id_order = np.argsort(ids, kind="stable")
            # before _held_maps: it would read the whole co-engagement map again
            engaged_keys = (_engaged_delta(e, user, source, held_before, engagement_stamp)
                            if stamped and engagements_due else None)
            views, engaged = _held_maps(e, user, source)
            if views_due and stamped and held_before is not None:
                # a user's view map is small and a view moves one entry of it: only the rows of the users whose
                # entries moved (a new row's columns are already those of the map now)
                keys = _changed_keys(held_before[2], views)
                rows = _rows_of_ids(ids, e.id_order, keys) if len(keys) > _FEW_KEYS else None
                if rows is None:  # a view's one or two users: their rows value by value (no numpy call per step)
                    _view_rows_of_few(e, ids, keys.tolist(), views, dirty, view_moved, points)
                elif len(rows):
                    columns = list(_BEHAVIOUR[:2])
                    moved_ids = ids[rows]
                    values, latest, has_view = view_columns_of_maps(moved_ids, np.argsort(moved_ids), views, None)
                    values = values[:, :2]
                    view_moved[rows] = (has_view != e.has_view[rows]) | (latest != e.view_latest[rows])
                    e.view_latest[rows], e.has_view[rows] = latest, has_view
                    block = np.ix_(rows, columns)
                    if not dirty.all():
                        dirty[rows[_bins_moved(points, columns, X[block], values)]] = True
                    X[block] = values
                views_due = False
            if engagements_due and not views_due:
                # the co-engagements (the map grows with the items engaged: one engagement moves many entries): the
                # column from the whole map, then only the rows whose count moved are written and checked
                column = _BEHAVIOUR[2]
                if engaged_keys is not None:  # the rows of the users whose count moved (_engaged_delta)
                    rows = _rows_of_ids(ids, e.id_order, engaged_keys)
                    get = engaged.get
                    now_rows = np.fromiter(map(get, ids[rows].tolist(), repeat(0)), np.float64, len(rows))
                    changed = now_rows != X[rows, column]
                    rows, now_rows = rows[changed], now_rows[changed]
                else:
                    counts = _co_engaged_column(ids, e.id_order, engaged)
                    rows = np.flatnonzero(counts != X[:, column])
                    now_rows = counts[rows]
                if len(rows):
                    if not dirty.all():
                        old = X[rows, column][:, None]
                        dirty[rows[_bins_moved(points, [column], old, now_rows[:, None])]] = True
                    X[rows, column] = now_rows
                engagements_due = False
            # the views on an entry's first update or from a source without stamps (with the co-engagements when
            # both are due): every row from the maps
            parts = [0, 1] * views_due + [2] * engagements_due
            if parts:
                columns = [_BEHAVIOUR[j] for j in parts]
                values, latest, has_view = view_columns_of_maps(ids, e.id_order, views if views_due else None,
                                                                engaged if engagements_due else None)
                values = values[:, parts]
                if views_due:
                    view_moved = (has_view != e.has_view) | (latest != e.view_latest)
                    e.view_latest, e.has_view = latest, has_view
                if not dirty.all():
                    dirty |= _bins_moved(points, columns, X[:, columns], values)
                X[:, columns] = values
        e.views_stamp, e.engagement_stamp = views_stamp, engagement_stamp

        # the held activity: a change re-computes the row's as-of columns
        if len(read):
            table = activity_table_for(source, ids[read], ids[read].tolist())
            held = e.activity
            moved_read = (table.known != held.known[read]) | (table.anchors != held.anchors[read]) | (
                table.values != held.values[read]).any(axis=1)
            held.values[read], held.anchors[read], held.known[read] = table.values, table.anchors, table.known
            view_moved[read[moved_read]] = True
        moved = view_moved
        if stamped:
            e.stamp = stamp_now

        fused = e.kernel.update(e, dirty, moved, fresh, as_of, k, query) if e.kernel is not None else None
        # the numeric tail in one C call where the kernel has the trees (the same bits), else step by step
        top, scored_rows = fused if fused is not None else self._rescore_and_order(e, scorer, dirty, moved, fresh,
                                                                                   as_of, k)
        self.stats.rows_rescored += scored_rows
        self.stats.rows_kept += n - scored_rows
        e.as_of = as_of
        e.updates += 1
        e.graph_changed = e.views_changed = False
        return top

    def _rescore_and_order(self, e: ListEntry, scorer: Scorer, dirty: np.ndarray, moved: np.ndarray,
                           fresh: np.ndarray, as_of: int, k: int) -> tuple[np.ndarray, int]:
        """The update's numeric tail: the moved or expired rows' as-of columns and validity, the dirty rows
        re-scored (through the cascade when the scorer has one), the top k ordered and brought to ``as_of``.
        Returns (top, rows scored); :meth:`_AsOfKernel.update` is the same in one C call."""
        X = e.features
        assert X is not None
        ids = e.candidates.ids
        n = len(ids)
        points = e.points
        expired = (e.valid_until <= as_of) if points is not None else np.ones(n, bool)
        # a dirty row too: its validity may be of its old paths (kept_rows_update's), which its new features left
        recompute = np.flatnonzero((moved | expired | dirty) & ~fresh)
        if len(recompute):  # nearly all of them crossed a bin (valid_until is the first crossing): re-scored
            e.valid_until[recompute] = self._fresh_validity(e, recompute, points, as_of)
            dirty[recompute] = True
        rescore = np.flatnonzero(dirty)  # a new row too, when the 2-hop maps gave it CN/AA after it was scored
        prefilter: Prefilter | None = getattr(scorer, "prefilter", None)
        if prefilter is None or e.pre is None or e.full is None:
            if len(rescore):
                e.scores[rescore] = np.asarray(scorer.predict(X[rescore]), np.float64)
        else:
            # the cascade: the moved rows' pre-ranker margins, the selection again, the full model for the passed
            # rows without a standing full score (a row's score depends only on its bins: a held one stands)
            if len(rescore):
                e.pre[rescore] = prefilter.margin(X[rescore])
                e.full[rescore] = np.nan
            passed = passed_rows(e.pre, ids, prefilter.candidates)
            missing = passed[np.isnan(e.full[passed])]
            if len(missing):
                e.full[missing] = np.asarray(scorer.predict(X[missing]), np.float64)
            e.scores = compose(e.full, e.pre, passed)
        top = ranking_order(e.scores, X[:, _DEGREE], ids, k)
        self._bring_to(e, top, as_of)
        return top, len(rescore)

    def _remeasure(self, e: ListEntry) -> None:
        """Account for the entry's bytes again after an update; within the budget again."""
        self.bytes -= e.nbytes
        self.bytes += e.measure()
        self._evict()

    @staticmethod
    def _keep_rows(e: ListEntry, index: np.ndarray) -> None:
        """Only the rows ``index`` (in their order) stay."""
        stats = dict(e.candidates.stats)
        e.candidates = replace(e.candidates.subset(index), stats=stats)
        e.features, e.scores, e.valid_until = e.features[index], e.scores[index], e.valid_until[index]
        if e.pre is not None and e.full is not None:
            e.pre, e.full = e.pre[index], e.full[index]
        e.activity = ActivityTable(e.activity.values[index], e.activity.anchors[index], e.activity.known[index])
        e.view_latest, e.has_view = e.view_latest[index], e.has_view[index]
        e.new_rows = np.empty(0, np.int64)
        e.id_order = e.handles = None

    def _add_rows(self, e: ListEntry, new: CandidateSet, user: int, source: RankingSource, builder: FeatureBuilder,
                  as_of: int, graph_later: bool = False) -> None:
        """Append the rows of ``new`` (new 2-hop users, promoted ANN neighbours), their features computed whole at
        ``as_of`` and scored. ``graph_later``: the update recomputes the graph and resource-allocation groups of
        every row after this (the user's 2-hop changed), so they are not computed here."""
        m = len(new)
        ids = new.ids
        added = ids.tolist()
        order = np.argsort(ids, kind="stable")
        views, engaged = _held_maps(e, user, source)
        behaviour, latest, has_view = view_columns_of_maps(ids, order, views, engaged)
        if _BEHAVIOUR_GROUP_KNOWN:  # the matrix's code for every other group; the behaviour from the held maps
            features = np.zeros((m, e.features.shape[1]))
            # not the activity group: its as-of columns are _fresh_validity's below, the query's the update's
            # not 2-hop users unless the 2-hop set is read again (graph_later): then their CN is that read's
            builder.columns(user, new, source, as_of, _GROUPS_ADDED_BUT_GRAPH if graph_later else _GROUPS_ADDED,
                            features, no_common_neighbours=not graph_later and not new.common_neighbor_count.any())
            features[:, _BEHAVIOUR] = behaviour
            features[:, _RECENCY] = view_recency_days(latest, has_view, as_of)
        else:
            features = builder.matrix(user, new, source, as_of)
        c = e.candidates
        n = len(c.ids)
        e.candidates = CandidateSet(
            user, np.concatenate([c.ids, ids]), np.concatenate([c.common_neighbor_count, new.common_neighbor_count]),
            np.concatenate([c.adamic_adar_score, new.adamic_adar_score]), np.concatenate([c.ann_score, new.ann_score]),
            np.concatenate([c.from_graph, new.from_graph]), np.concatenate([c.from_ann, new.from_ann]),
            dict(c.stats), np.concatenate([c.from_popular if c.from_popular is not None else np.zeros(n, bool),
                                           new.from_popular if new.from_popular is not None else np.zeros(m, bool)]))
        e.features = np.concatenate([e.features, features])
        e.scores = np.concatenate([e.scores, np.full(m, np.nan)])  # scored by the update with the other dirty rows
        if e.pre is not None and e.full is not None:
            e.pre = np.concatenate([e.pre, np.full(m, np.nan, e.pre.dtype)])
            e.full = np.concatenate([e.full, np.full(m, np.nan)])
        table = activity_table_for(source, ids, added)
        e.activity = ActivityTable(np.concatenate([e.activity.values, table.values]),
                                   np.concatenate([e.activity.anchors, table.anchors]),
                                   np.concatenate([e.activity.known, table.known]))
        e.view_latest, e.has_view = np.concatenate([e.view_latest, latest]), np.concatenate([e.has_view, has_view])
        e.new_rows = np.concatenate([e.new_rows, np.arange(n, n + m)])
        e.id_order = e.handles = None
        e.valid_until = np.concatenate([e.valid_until, np.zeros(m, np.int64)])
        e.valid_until[e.new_rows] = self._fresh_validity(e, e.new_rows, e.points, as_of)

    @staticmethod
    def _reorder(e: ListEntry, kept: np.ndarray | None = None, added_from: int = 0) -> None:
        """Rows in Stage 1's rough order (candidates.py: AA + ann_weight·max(cos, 0) rounded, count, id); with
        ``kept``, only those rows below ``added_from`` stay (the rows from ``added_from`` on, added by this update,
        all do): the keep and the reorder in one gather."""
        c = e.candidates
        config: CandidateConfig = e.key[1]
        rows = None if kept is None else np.concatenate([kept, np.arange(added_from, len(c.ids))])
        ids, counts, adamic_adar, ann_score = ((c.ids, c.common_neighbor_count, c.adamic_adar_score, c.ann_score)
                                               if rows is None else
                                               (c.ids[rows], c.common_neighbor_count[rows], c.adamic_adar_score[rows],
                                                c.ann_score[rows]))
        rough = adamic_adar + config.ann_weight * np.nan_to_num(np.maximum(ann_score, 0.0), nan=0.0)
        order = np.lexsort((ids, -counts, -np.round(rough, _AA_DECIMALS)))
        if rows is None and np.array_equal(order, np.arange(len(order))):
            return
        if rows is not None:
            order = rows[order]
        stats = dict(c.stats)
        e.candidates = replace(c.subset(order), stats=stats)
        e.features, e.scores, e.valid_until = e.features[order], e.scores[order], e.valid_until[order]
        if e.pre is not None and e.full is not None:
            e.pre, e.full = e.pre[order], e.full[order]
        e.activity = ActivityTable(e.activity.values[order], e.activity.anchors[order], e.activity.known[order])
        e.view_latest, e.has_view = e.view_latest[order], e.has_view[order]
        e.id_order = e.handles = None
        if len(e.new_rows):  # all of them at or past added_from: kept
            position = np.empty(len(c.ids), np.int64)
            position[order] = np.arange(len(order))
            e.new_rows = position[e.new_rows]

    # ---- as-of columns ----------------------------------------------------------------------------------------------
    @classmethod
    def _fresh_validity(cls, e: ListEntry, rows: np.ndarray, points: SplitPoints | None, as_of: int) -> np.ndarray:
        """The as-of columns of ``rows`` brought to ``as_of`` (in the matrix), and their :meth:`_validity`, no later
        than the query's columns' (``e.query_until``: they are the same in every row)."""
        if e.kernel is not None:
            return np.minimum(e.kernel.run(e, rows, as_of, points), e.query_until)
        block = cls._as_of_columns(e, rows, as_of)
        return np.minimum(cls._validity(e, rows, points, as_of, block), e.query_until)

    @staticmethod
    def _as_of_columns(e: ListEntry, rows: np.ndarray, as_of: int) -> np.ndarray:
        """The per-row as-of columns of ``rows`` at ``as_of``, from the held activity and views, written to the
        matrix and returned ((m, 4) candidate activity columns): the arithmetic of candidate_activity_columns and
        view_recency_days (features.py), fused: the same float64 operations in the same order, one pass of
        math.exp over the rows' (age, τ) pairs (numpy's exp may differ from libm's in the last bit)."""
        a = e.activity
        known, anchors = a.known[rows], a.anchors[rows]
        m = len(rows)
        block = np.empty((m, len(_TAUS) + 1))
        ages = np.maximum(as_of - anchors, 0)
        exponents = -ages[:, None] / _TAUS  # activity_at's int true division: exact operands, IEEE rounding
        factors = np.fromiter(map(math.exp, exponents.ravel().tolist()), np.float64, exponents.size)
        block[:, :-1] = np.where(known[:, None], a.values[rows] * factors.reshape(m, len(_TAUS)), 0.0)
        block[:, -1] = np.maximum(0.0, as_of - np.where(known, anchors.astype(np.float64), np.nan)) / DAY_MS
        X = e.features
        X[rows, _ACTIVITY : _DAYS_SINCE + 1] = block
        X[rows, _RECENCY] = view_recency_days(e.view_latest[rows], e.has_view[rows], as_of)
        return block

    def _bring_to(self, e: ListEntry, rows: np.ndarray, as_of: int) -> None:
        """Make the as-of columns of ``rows`` exact at ``as_of`` (their scores stand: same bins)."""
        if not len(rows):
            return
        if e.kernel is not None:
            e.kernel.run(e, np.asarray(rows, np.int64), as_of, None)
        else:
            self._as_of_columns(e, np.asarray(rows, np.int64), as_of)

    @staticmethod
    def _validity(e: ListEntry, rows: np.ndarray, points: SplitPoints | None, as_of: int,
                  block: np.ndarray | None = None) -> np.ndarray:
        """Per row of ``rows`` (whose as-of columns are as of ``as_of``; ``block``: their activity columns when at
        hand): the as-of time before which no as-of column crosses a threshold of the model; ``as_of`` itself
        (re-score next time) without split points."""
        if points is None:
            return np.full(len(rows), as_of, np.int64)
        X = e.features
        a = e.activity
        if block is None:
            block = X[rows, _ACTIVITY : _DAYS_SINCE + 1]
        anchors = a.anchors[rows].astype(np.float64)
        held = a.values[rows]
        until = np.full(len(rows), _NEVER, np.int64)
        for j, tau in enumerate(ACTIVITY_TIME_CONSTANTS_MS):
            thresholds = points.exact[_ACTIVITY + j]
            if len(thresholds):
                until = np.minimum(until, _until_falling(block[:, j], held[:, j], anchors, float(tau), thresholds))
        until = np.minimum(until, _until_growing(block[:, -1], anchors, points.below[_DAYS_SINCE]))
        until = np.minimum(until, _until_growing(X[rows, _RECENCY], e.view_latest[rows].astype(np.float64),
                                                 points.below[_RECENCY]))
        return until

    # ---- memory ------------------------------------------------------------------------------------------------
    def _keep(self, entry: ListEntry) -> None:
        self._drop(entry.user)
        size = entry.measure()
        if size > self.config.max_bytes:
            entry.pack()
            size = entry.measure()
            if size > self.config.max_bytes:
                return
        self.entries[entry.user] = entry
        if entry.features is not None:
            self._unpacked[entry.user] = None
        self.bytes += size
        self._evict()

    def _drop(self, user: int) -> None:
        old = self.entries.pop(user, None)
        self._unpacked.pop(user, None)
        if old is not None:
            self.bytes -= old.nbytes

    def _evict(self) -> None:
        """Past the budget: pack the least recently used unpacked matrices, then evict the least recent entries."""
        while self.bytes > self.config.max_bytes:
            if self._unpacked:
                user, _ = self._unpacked.popitem(last=False)
                entry = self.entries[user]
                before = entry.nbytes
                entry.pack()
                self.bytes += entry.measure() - before
                self.stats.packs += 1
                continue
            if len(self.entries) <= 1:
                return
            user, old = self.entries.popitem(last=False)
            self.bytes -= old.nbytes
            self.stats.evictions += 1


# ---- helpers ----------------------------------------------------------------------------------------------------
def _ann_spares(user: int, source: RankingSource, config: CandidateConfig, excluded: frozenset[int],
                c: CandidateSet) -> tuple[np.ndarray, np.ndarray]:
    """The ANN answer for ann_k + ANN_SPARES with the kept list's exclusions, when its first ann_k are the kept
    ANN rows with their cosines (an approximate index may answer a larger k differently, and the index may have
    moved since the build: then none, and a dropped ANN row means a full build)."""
    answer = list(source.ann_neighbours(user, config.ann_k + ANN_SPARES, excluded))
    ids = np.fromiter((int(u) for u, _ in answer), np.int64, len(answer))
    cos = np.fromiter((float(x) for _, x in answer), np.float64, len(answer))
    head, mine = ids[: config.ann_k], c.ids[c.from_ann]
    order = np.argsort(head)
    if len(head) != len(mine) or not np.array_equal(head[order], np.sort(mine)):
        return np.empty(0, np.int64), np.empty(0)
    row_of = np.argsort(c.ids)
    rows = row_of[np.searchsorted(c.ids[row_of], head)]
    if not np.array_equal(c.ann_score[rows], cos[: config.ann_k]):
        return np.empty(0, np.int64), np.empty(0)
    return ids, cos


def _same_ann(answer: Sequence[tuple[int, float]], c: CandidateSet) -> bool:
    """Whether ``answer`` (an ANN answer, best first) is the kept ANN rows with their cosines."""
    mine = c.ids[c.from_ann]
    if len(answer) != len(mine):
        return False
    ids = np.fromiter((int(u) for u, _ in answer), np.int64, len(answer))
    cos = np.fromiter((float(x) for _, x in answer), np.float64, len(answer))
    order = np.argsort(ids)
    if not np.array_equal(ids[order], np.sort(mine)):
        return False
    row_of = np.argsort(c.ids)
    rows = row_of[np.searchsorted(c.ids[row_of], ids)]
    return bool(np.array_equal(c.ann_score[rows], cos))


def _held_maps(e: ListEntry, user: int, source: RankingSource) -> tuple[Mapping[int, Any], Mapping[int, int]]:
    """The user's views (other → (out, in, latest)) and co-engagements (other → count), read again only when the
    source's stamps say they moved (kept on the entry, copies); read every time from a source without stamps."""
    if not implements(source, ChangeStampSource):
        return source.profile_views(user), source.co_engaged_counts(user)
    views_stamp, engagement_stamp = source.views_stamp(user), source.co_engagement_stamp(user)
    held = e.maps
    if held is None or held[0] != views_stamp or held[1] != engagement_stamp:
        views = held[2] if held is not None and held[0] == views_stamp else dict(source.profile_views(user))
        if held is not None and held[1] == engagement_stamp:
            engaged = held[3]
        elif implements(source, ItemEngagementSource):  # counted from the items' engagers, kept for _engaged_delta
            e.item_engagers = {item: frozenset(source.item_engagers(item)) for item in source.engaged_items(user)}
            engaged = dict(Counter(chain.from_iterable(e.item_engagers.values())))
            engaged.pop(user, None)
        else:
            engaged = dict(source.co_engaged_counts(user))
            e.item_engagers = None
        held = e.maps = (views_stamp, engagement_stamp, views, engaged)
    return held[2], held[3]


def _engaged_delta(e: ListEntry, user: int, source: RankingSource, held_before: tuple[Any, ...] | None,
                   engagement_stamp: int) -> np.ndarray | None:
    """The users (sorted) whose co-engagement count with ``user`` moved since the held map was counted, the held
    map (and its items' engagers) brought to ``engagement_stamp`` in place; None when it cannot tell (no
    ItemEngagementSource, or the rows' counts are not those of the held map: then the whole map is read again).

    An engagement moves one item's engagers, and a user's count is the number of its items whose engagers hold
    the other: only the items whose stamp moved are read, their engagers compared with the held ones, and the
    users that came or went recounted over the user's items (a few sets, not the whole map: ~0.25 ms a list)."""
    held = e.maps
    snapshot = e.item_engagers
    if (held is None or held_before is None or held[3] is not held_before[3] or snapshot is None
            or not implements(source, ItemEngagementSource)):
        return None
    since = held[1]
    items = source.engaged_items(user)
    moved: set[int] = set()
    for item in items:
        if item in snapshot and source.item_stamp(item) <= since:
            continue
        now = frozenset(source.item_engagers(item))
        before = snapshot.get(item)
        if before is None:
            moved |= now
        elif now != before:
            moved |= before ^ now
        snapshot[item] = now
    if len(snapshot) != len(items):  # an item the user no longer has: its engagers lose one
        for item in [item for item in snapshot if item not in items]:
            moved |= snapshot.pop(item)
    moved.discard(user)
    engaged = held[3]
    assert isinstance(engaged, dict)  # the entry's own copy (_held_maps)
    held_sets = [snapshot[item] for item in items]
    for other in moved:
        count = sum(other in engagers for engagers in held_sets)
        if count:
            engaged[other] = count
        else:
            engaged.pop(other, None)
    e.maps = (held[0], engagement_stamp, held[2], engaged)
    return np.asarray(sorted(moved), np.int64)


def _changed_keys(before: Mapping[int, Any], now: Mapping[int, Any]) -> np.ndarray:
    """The keys (sorted) whose entry differs between two maps (added, removed or changed)."""
    if before is now:
        return np.empty(0, np.int64)  # held again: the stamp did not move
    changed = {k for k, v in now.items() if before.get(k) != v}
    changed.update(k for k in before if k not in now)
    return np.asarray(sorted(changed), np.int64)


_FEW_KEYS = 4


def _view_rows_of_few(e: ListEntry, ids: np.ndarray, keys: list[int], views: Mapping[int, Any], dirty: np.ndarray,
                      view_moved: np.ndarray, points: SplitPoints | None) -> None:
    """The view columns of the rows of a few moved ``keys`` from ``views``, as view_columns_of_maps writes them
    (viewed, mutual = min of both ways; the latest view and whether any), in scalars: a row whose held view moved is
    marked in ``view_moved`` (its recency is an as-of column), one whose value left a bin of the model dirty."""
    X = e.features
    assert X is not None
    columns = _BEHAVIOUR[:2]
    all_dirty = bool(dirty.all())
    for key in keys:
        for row in np.flatnonzero(ids == key).tolist():
            held = views.get(key)
            values = (0.0, 0.0) if held is None else (float(held[0]), float(min(held[0], held[1])))
            latest, has_view = (0, False) if held is None else (int(held[2]), True)
            if has_view != bool(e.has_view[row]) or latest != int(e.view_latest[row]):
                view_moved[row] = True
            e.view_latest[row], e.has_view[row] = latest, has_view
            for column, value in zip(columns, values, strict=True):
                old = float(X[row, column])
                if not all_dirty and _value_moved(points, column, old, value):
                    dirty[row] = True
                X[row, column] = value


def _value_moved(points: SplitPoints | None, column: int, old: float, new: float) -> bool:
    """Whether ``old`` → ``new`` in ``column`` can change a comparison of the model: the float32 left its bin
    (:meth:`SplitPoints.bin`: bisect on the thresholds' list; NaN its own bin); without split points, any change."""
    if old == new or (math.isnan(old) and math.isnan(new)):
        return False
    if points is None:
        return True
    return bool(points.exact_lists[column]) and points.bin(column, old) != points.bin(column, new)


def _co_engaged_column(ids: np.ndarray, order: np.ndarray, engaged: Mapping[int, int]) -> np.ndarray:
    """Per row of ``ids`` (``order`` = ``np.argsort(ids)``, which the entry holds) the co-engaged count as float64
    (0 without), as view_columns_of_maps writes its third column: the map's keys found among the sorted ids."""
    out = np.zeros(len(ids))
    if not engaged or not len(ids):
        return out
    keys = np.fromiter(engaged.keys(), np.int64, len(engaged))
    counts = np.fromiter(engaged.values(), np.int64, len(engaged))
    sorted_ids = ids[order]
    position = np.minimum(np.searchsorted(sorted_ids, keys), len(ids) - 1)
    hit = sorted_ids[position] == keys
    out[order[position[hit]]] = counts[hit]
    return out


def _rows_of_ids(ids: np.ndarray, order: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """The rows (ascending) of ``ids`` (``order`` = ``np.argsort(ids)``) that hold one of the sorted ``keys``."""
    if not len(keys) or not len(ids):
        return np.empty(0, np.int64)
    if len(keys) <= _FEW_KEYS:  # a view's one or two users: a comparison per key beats a gather of every id
        return np.sort(np.concatenate([np.flatnonzero(ids == key) for key in keys.tolist()]))
    sorted_ids = ids[order]
    position = np.minimum(np.searchsorted(sorted_ids, keys), len(ids) - 1)
    hit = sorted_ids[position] == keys
    return np.sort(order[position[hit]])


def _moved_parts(e: ListEntry, source: RankingSource) -> tuple[Any, ...] | None:
    """(the source's stamp, the entry's handles, then per part — degree or activity, embedding, profile — which
    kept rows the change stamps say moved since the entry's last update); None without stamps or when nothing
    moved."""
    if not implements(source, ChangeStampSource) or e.stamp < 0:
        return None
    stamp = source.change_stamp()
    if stamp == e.stamp:
        return None
    if e.handles is None:
        e.handles = source.stamp_handles(e.candidates.ids)
    return (stamp, e.handles, *(source.changed_since(e.handles, e.stamp, part)
                                for part in ("graph", "embedding", "profile")))


def _changed_share(moved_parts: tuple[Any, ...] | None) -> float:
    """The share of the kept rows whose per-user reads moved (:func:`_moved_parts`); 0 without stamps."""
    if moved_parts is None or not len(moved_parts[1]):
        return 0.0
    moved = moved_parts[2] | moved_parts[3]
    moved |= moved_parts[4]
    return np.count_nonzero(moved) / len(moved)  # not .mean(): its reduction machinery costs more than the count


def _incremental_source(source: RankingSource) -> bool:
    """The reads the update needs: activity (held, in one batch)."""
    return implements(source, ActivitySource) and (implements(source, ActivityTableSource)
                                                   or implements(source, IdArraySource))


def _excluded(user: int, source: RankingSource, config: CandidateConfig, as_of: int) -> frozenset[int]:
    """Stage 1's excluded users (the default filters)."""
    filters = _FILTERS.get(config)
    if filters is None:
        filters = _FILTERS[config] = default_filters(config)  # stateless: made once per config
    excluded: set[int] = set()
    for candidate_filter in filters:
        excluded.update(candidate_filter.excluded(user, source, as_of))
    return frozenset(excluded)


_FILTERS: dict[CandidateConfig, tuple[Any, ...]] = {}


def _popular(user: int, source: RankingSource, config: CandidateConfig, as_of: int,
             excluded: frozenset[int]) -> tuple[int, ...]:
    """Stage 1's popular list (candidates.py, the same ask and filter)."""
    if config.popular_k <= 0 or not implements(source, PopularSource):
        return ()
    asked = source.most_active(config.popular_k + len(excluded), as_of)
    # the first popular_k not excluded: the walk stops there (asked holds popular_k + every excluded user)
    return tuple(islice(filterfalse(excluded.__contains__, map(int, asked)), config.popular_k))


def _query_columns(query: QueryActivity, as_of: int) -> tuple[float, float]:
    """The query user's 7-day activity and days since its latest change at ``as_of``, from its held activity
    (:func:`_query_activity`) with the arithmetic of activity_at and the matrix (the same bits)."""
    held, anchor, known = query
    if not known:
        return 0.0, math.nan
    elapsed = max(0, as_of - anchor)
    return held * math.exp(-elapsed / ACTIVITY_TIME_CONSTANTS_MS[1]), elapsed / DAY_MS


def _query_activity(user: int, source: RankingSource) -> QueryActivity:
    """The query user's held activity behind its two as-of columns: (7-day count at the anchor, anchor, known); the
    count read at the anchor itself is the held one (a decay over 0 ms multiplies by exp(-0.0) = 1)."""
    assert implements(source, ActivitySource)
    anchor = source.last_connection_ts(user)
    if anchor is None:
        return (0.0, 0, 0)
    return (float(source.connection_activity(user, anchor)[1]), int(anchor), 1)


def _query_until(query: QueryActivity, points: SplitPoints | None, as_of: int) -> int:
    """The as-of time before which the query's 7-day count and days since (from ``query``) keep their side of every
    threshold of the model (what a row's validity over every threshold also counts on); a row's paths' validity
    (kept_rows_update) has the query's thresholds on its paths instead."""
    held, anchor, known = query
    if points is None or not known:  # never connected: 0 and NaN, until the activity moves
        return _NEVER
    # _until_falling and _until_growing for one value each, in scalars (bisect on the thresholds' lists)
    until = _NEVER
    tau = ACTIVITY_TIME_CONSTANTS_MS[1]
    value, days = _query_columns(query, as_of)
    exact = points.exact_lists[_QUERY_ACTIVITY]
    index = bisect.bisect_right(exact, float(np.float32(value))) - 1
    if index >= 0 and exact[index] > 0 and held > 0:
        span = tau * math.log(held / exact[index])
        until = math.floor(anchor + span - 1.0 - 1e-9 * abs(span))
    below = points.below_lists[_QUERY_DAYS]
    index = bisect.bisect_left(below, float(np.float32(days)))
    if index < len(below):
        span = below[index] * DAY_MS
        until = min(until, math.floor(anchor + span - 1.0 - 1e-9 * span))
    return int(until)


def _query_bins(X: np.ndarray, points: SplitPoints | None) -> tuple[float, float]:
    if not len(X):
        return (math.nan, math.nan)
    values = (float(X[0, _QUERY_ACTIVITY]), float(X[0, _QUERY_DAYS]))
    if points is None:
        return values
    return (points.bin(_QUERY_ACTIVITY, values[0]), points.bin(_QUERY_DAYS, values[1]))


def _same_bins(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return all(x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(a, b, strict=True))


def connection_touches(source: RankingSource, u: int, v: int) -> tuple[set[int], set[int]]:
    """Whose lists a connection change between ``u`` and ``v`` touches, as the worker's graph reports it
    (``take_changed_users``): (own change: u and v; 2-hop change: the users adjacent to either, whose 2-hop set
    and AA/RA weights moved through someone else's connection). Both go to
    :meth:`IncrementalLists.mark_graph_changed`. Call it after applying an added edge (a removed one: with the
    neighbours of before)."""
    own = {u, v}
    two_hop = (set(source.neighbours(u)) | set(source.neighbours(v))) - own
    return own, two_hop


__all__ = ["IncrementalLists", "ListCacheConfig", "ListCacheStats", "ListEntry", "SplitPoints",
           "connection_touches", "shadow_sampled", "split_points"]
