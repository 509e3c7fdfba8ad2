"""The cascade: a small pre-ranker fitted to the served model's margins picks the rows the full model scores.

A list of 2,000 candidates through the design's 500-tree depth-6 model costs ~3 ms of a single core, the largest
part of a list's CPU; a 50-tree depth-4 regression forest fitted to that model's margins costs ~0.27 ms for the
same rows and puts the full model's top 20 within its own top 300 in nearly every list. So a list of more than
``candidates`` (M) rows is scored in two steps:

1. the :class:`Prefilter` gives every row a margin;
2. the M rows with the highest ones (ties: the lower candidate id, so the choice does not depend on row order)
   get the full model's score; every other row gets ``floor · σ(pre-margin)``, ``floor`` being the next double
   below the lowest full score: below every passed row, in the pre-ranker's order (:func:`compose`).

A list of M rows or fewer is the full model's, bit for bit. The final order then takes the top 20 among the passed
rows only, by the full model's scores and the contract's tie rule.

It is an approximation, so it is attached only where it holds: :func:`attach_cascade` fits the pre-ranker on the
training rows and keeps it, with the smallest M that holds, when the top 20 of the validation lists equal the full
model's in at least ``min_top20_equal_share`` (99 %) of them less two standard errors; the model's metadata says
which, with the shares. Every caller scores a list through :func:`list_scores` (the worker's full builds, its kept
lists, offline evaluation), so they agree.
The kept lists (ranking/incremental.py) hold both the pre-ranker's margins and the full scores of the rows, and
re-select at every update (see :func:`passed_rows`).

Pure: numpy and xgboost only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import xgboost as xgb

from pymk.ranking.tree_eval import CompiledEvaluator, EvaluatorOptions, build_evaluator

PREFILTER_FILE = "prefilter.ubj"
TOP_K = 20  # the list a person sees: what the cascade must keep


@dataclass(frozen=True)
class CascadeConfig:
    """The pre-ranker's shape and how many rows it passes on. Measured on the bench's 500-tree model (docs/
    benchmarks.md, "The cascade"): 50 depth-4 trees kept the top 20 in 60/60 lists at M = 200 and 300; M = 100
    lost 2/60."""

    # M, the rows the full model scores: the smallest of these that holds on the validation lists; none: no
    # cascade. A list of M rows or fewer is scored by the full model alone.
    candidates: tuple[int, ...] = (200, 300, 500, 800)
    trees: int = 50
    max_depth: int = 4
    learning_rate: float = 0.3
    # what the validation lists must show: their share minus two standard errors at least this (a share measured
    # on a few hundred lists is itself uncertain: CollegeMsg's 0.9915 on 471 validation lists was 0.987 on the test)
    min_top20_equal_share: float = 0.99
    fit_rows: int = 400_000  # at most this many training rows (a seeded sample beyond)
    seed: int = 0
    train_threads: int = 2

    def __post_init__(self) -> None:
        if any(m < TOP_K for m in self.candidates) or list(self.candidates) != sorted(set(self.candidates)):
            raise ValueError(f"the cascade's choices of M must be ascending and at least the {TOP_K} rows a list "
                             f"shows: {self.candidates}")


class Prefilter:
    """The pre-ranker: a regression forest of the served model's margins, scored by the compiled evaluator when
    it can be (else XGBoost). ``candidates``: the M of its cascade."""

    def __init__(self, booster: xgb.Booster, candidates: int, evaluator_options: EvaluatorOptions | None = None
                 ) -> None:
        self.booster = booster
        self.candidates = int(candidates)
        self.booster.set_param({"nthread": 1})
        self._compiled: CompiledEvaluator | None
        self._compiled, self.evaluator = build_evaluator(booster, evaluator_options or EvaluatorOptions.from_env())

    @classmethod
    def fit(cls, margin: Callable[[np.ndarray], np.ndarray], features: np.ndarray, config: CascadeConfig,
            evaluator_options: EvaluatorOptions | None = None) -> Prefilter:
        """Fit to ``margin(features)`` (the served model's log-odds) on up to ``config.fit_rows`` of the rows."""
        rows = np.asarray(features)
        if len(rows) > config.fit_rows:
            pick = np.sort(np.random.default_rng(config.seed).choice(len(rows), config.fit_rows, replace=False))
            rows = rows[pick]
        target = np.asarray(margin(rows), np.float32)
        params = {"objective": "reg:squarederror", "max_depth": config.max_depth, "eta": config.learning_rate,
                  "tree_method": "hist", "seed": config.seed, "nthread": config.train_threads}
        booster = xgb.train(params, xgb.DMatrix(rows, label=target, missing=np.nan), num_boost_round=config.trees)
        return cls(booster, config.candidates[-1] if config.candidates else 0, evaluator_options)

    def margin(self, features: np.ndarray) -> np.ndarray:
        if self._compiled is not None:
            return self._compiled.margin(features)
        return self.booster.inplace_predict(features, predict_type="margin", missing=np.nan)

    def raw(self) -> bytes:
        return bytes(self.booster.save_raw("ubj"))

    @classmethod
    def from_raw(cls, raw: bytes, candidates: int, evaluator_options: EvaluatorOptions | None = None) -> Prefilter:
        booster = xgb.Booster()
        booster.load_model(bytearray(raw))
        return cls(booster, candidates, evaluator_options)


def passed_rows(pre: np.ndarray, ids: np.ndarray, m: int) -> np.ndarray:
    """Indices (ascending) of the ``m`` rows with the highest pre-ranker margins, ties to the lower candidate id;
    every row when there are ``m`` or fewer."""
    n = len(pre)
    if n <= m:
        return np.arange(n)
    values = np.asarray(pre, np.float64)
    kth = np.partition(values, n - m)[n - m]  # the m-th highest
    above = np.flatnonzero(values > kth)
    tied = np.flatnonzero(values == kth)
    wanted = m - len(above)
    if wanted < len(tied):
        tied = tied[np.argsort(ids[tied], kind="stable")[:wanted]]
    return np.sort(np.concatenate([above, tied]))


def compose(full: np.ndarray, pre: np.ndarray, passed: np.ndarray) -> np.ndarray:
    """The list's scores (float64): the full model's on the ``passed`` rows (``full`` is read there only); on the
    others ``floor · σ(pre)``, with ``floor`` the next double below the lowest passed score, so they sort after
    every passed row and among themselves in the pre-ranker's order."""
    n = len(pre)
    if len(passed) == n:
        return np.asarray(full, np.float64).copy()
    scores = np.empty(n)
    passed_scores = np.asarray(full, np.float64)[passed]
    floor = float(np.nextafter(passed_scores.min(), -math.inf)) if len(passed_scores) else 0.0
    scores[:] = floor * (1.0 / (1.0 + np.exp(-np.asarray(pre, np.float64)))) if floor > 0 else floor
    scores[passed] = passed_scores
    return scores


def list_scores(scorer: Any, features: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """One list's scores (float64) and the pre-ranker's margins (None without a cascade): the cascade of the
    scorer's :class:`Prefilter` when it has one and the list is longer than its M, else ``scorer.predict``."""
    prefilter: Prefilter | None = getattr(scorer, "prefilter", None)
    if prefilter is None or len(features) <= prefilter.candidates:
        return np.asarray(scorer.predict(features), np.float64), None
    pre = prefilter.margin(features)
    return cascade_scores(pre, ids, prefilter.candidates,
                          lambda rows: np.asarray(scorer.predict(features[rows]), np.float64)), pre


def cascade_scores(pre: np.ndarray, ids: np.ndarray, m: int, full_of: Callable[[np.ndarray], np.ndarray]
                   ) -> np.ndarray:
    """A list's scores through a cascade passing ``m`` rows: ``full_of(rows)`` gives the full model's scores of the
    passed rows (indices), :func:`compose` the rest."""
    passed = passed_rows(pre, ids, m)
    full = np.full(len(pre), np.nan)
    full[passed] = full_of(passed)
    return compose(full, pre, passed)


@dataclass(frozen=True)
class ListSample:
    """A whole Stage 1 list: its rows' features and candidate ids (what a validation case holds)."""

    features: np.ndarray
    ids: np.ndarray
    degree_key: np.ndarray  # the tie rule's degree column


def top20_equal_shares(scorer: Any, prefilter: Prefilter, lists: Sequence[ListSample],
                       choices: Sequence[int]) -> tuple[dict[int, float], dict[int, int]]:
    """For each M of ``choices``: of the ``lists`` longer than M (where the cascade acts), the share whose top 20
    through the cascade equals the full model's (rows and order), NaN when none is longer; and how many lists."""
    from pymk.ranking.recommend import ranking_order

    equal = dict.fromkeys(choices, 0)
    counted = dict.fromkeys(choices, 0)
    for sample in lists:
        if len(sample.ids) <= min(choices, default=0):
            continue
        full = np.asarray(scorer.predict(sample.features), np.float64)
        exact = ranking_order(full, sample.degree_key, sample.ids, TOP_K)
        pre = prefilter.margin(sample.features)
        for m in choices:
            if len(sample.ids) <= m:
                continue
            counted[m] += 1
            # the passed rows' full scores from the whole list's: bit for bit what list_scores computes
            mixed = cascade_scores(pre, sample.ids, m, lambda rows, full=full: full[rows])
            top = ranking_order(mixed, sample.degree_key, sample.ids, TOP_K)
            equal[m] += bool(np.array_equal(top, exact))
    return {m: equal[m] / counted[m] if counted[m] else math.nan for m in choices}, counted


def attach_cascade(ranker: Any, train_features: np.ndarray, lists: Sequence[ListSample],
                   config: CascadeConfig) -> tuple[Any, dict[str, Any]]:
    """``ranker`` with a pre-ranker fitted on ``train_features`` and the smallest M of ``config.candidates`` whose
    top 20 on ``lists`` (validation lists the fit never saw; those longer than M) equal the full model's in a share
    whose lower bound (less two standard errors) is at least ``config.min_top20_equal_share``; else ``ranker`` as
    it is. Returns the ranker and the evidence (also put in its metadata under ``cascade``: every M's share and
    bound, the decision, ``candidates`` the M served)."""
    evidence: dict[str, Any] = {"config": asdict(config)}
    smallest = config.candidates[0] if config.candidates else 0
    longer = [sample for sample in lists if len(sample.ids) > smallest]
    evidence["validation_lists"], evidence["lists_longer_than_m"] = len(lists), len(longer)
    if not config.candidates:
        evidence["decision"], evidence["why"] = "off", "config: no M to choose from"
    elif not longer:
        evidence["decision"], evidence["why"] = "off", "no validation list is longer than M: nothing to measure"
    elif ranker.floor is not None and ranker.floor.weight is None:
        evidence["decision"], evidence["why"] = "off", "the ranker serves a heuristic alone: nothing to save"
    else:
        prefilter = Prefilter.fit(ranker.margin, train_features, config, ranker.evaluator_options)
        shares, counts = top20_equal_shares(ranker, prefilter, longer, config.candidates)
        bounds = {m: share - 2.0 * math.sqrt(share * (1.0 - share) / counts[m]) if counts[m] else math.nan
                  for m, share in shares.items()}
        # None for an M no list is longer than (JSON has no NaN)
        evidence["top20_equal_share_by_m"] = {str(m): None if math.isnan(x) else x for m, x in shares.items()}
        evidence["lower_bound_by_m"] = {str(m): None if math.isnan(x) else x for m, x in bounds.items()}
        evidence["lists_by_m"] = {str(m): counts[m] for m in counts}
        evidence["fit_rows"] = int(min(len(train_features), config.fit_rows))
        # an M no list is longer than was not measured (NaN), and would change nothing on lists like these
        held = [m for m, bound in bounds.items() if bound >= config.min_top20_equal_share]
        if held:
            evidence["decision"], evidence["candidates"] = "on", held[0]
            evidence["top20_equal_share"] = shares[held[0]]
            return ranker.with_prefilter(Prefilter(prefilter.booster, held[0], ranker.evaluator_options),
                                         evidence), evidence
        best = max((m for m in shares if not math.isnan(shares[m])), key=lambda m: bounds[m], default=None)
        evidence["decision"] = "off"
        evidence["top20_equal_share"] = shares[best] if best is not None else None
        evidence["why"] = ("no validation list is longer than M" if best is None else
                           f"at best (M {best}) top 20 equal in {shares[best]:.4f} of {counts[best]} validation "
                           f"lists, {bounds[best]:.4f} less two standard errors: under {config.min_top20_equal_share}")
    ranker.metadata["cascade"] = evidence
    return ranker, evidence


def cascade_description(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """A ranker's cascade for ``/stats``: on or off, M, and the validation share it was kept (or dropped) on."""
    cascade = metadata.get("cascade") or {}
    config = cascade.get("config") or {}
    return {"decision": cascade.get("decision", "off"), "candidates": cascade.get("candidates"),
            "pre_ranker_trees": config.get("trees"), "validation_top20_equal_share": cascade.get("top20_equal_share"),
            "why_off": cascade.get("why") if cascade.get("decision") != "on" else None}


__all__ = ["PREFILTER_FILE", "CascadeConfig", "ListSample", "Prefilter", "attach_cascade", "cascade_description",
           "cascade_scores", "compose", "list_scores", "passed_rows", "top20_equal_shares"]
