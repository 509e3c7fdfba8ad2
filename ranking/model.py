"""Stage 2 model: a gradient-boosted tree classifier (XGBoost) of "this pair connects soon", with its
version, metadata and explanations.

* :meth:`Ranker.train` fits ``binary:logistic`` with early stopping on a validation split and keeps only the
  trees up to the best iteration, so saved, loaded and in-memory predictions all use the same trees. What
  decides: a :class:`ListMetric` when given (Recall@20 over whole validation lists, the number the product is
  judged by, evaluated every :attr:`RankerConfig.list_metric_every` trees), else the last of ``eval_metric``
  (AUC of the sampled rows).
* A :class:`HeuristicFloor` in the metadata makes the ranker serve ``margin + weight · h(x)`` (a blend with a
  reference heuristic, ``h`` = log1p of its column over a scale) or ``h(x)`` alone (the fallback), chosen on
  validation when the trees alone do not beat the heuristic (:mod:`pymk.ranking.training_data`). Row-wise, so
  every caller (worker, offline evaluation, a list re-scored in part) gets the same scores.
* :meth:`Ranker.predict` and :meth:`Ranker.margin` go through the compiled tree evaluator
  (:mod:`pymk.ranking.tree_eval`, bit-identical to XGBoost, ~7x faster on one core), prepared at
  :meth:`Ranker.load` (or at the first prediction); where it cannot be used, ``Booster.inplace_predict`` on the
  numpy matrix, and :attr:`Ranker.evaluator` says why. The worker and offline evaluation share this path.
* :meth:`Ranker.contributions` gives TreeSHAP values (``pred_contribs``): one column per feature plus the bias,
  summing to the margin (log-odds) of each row. The reasons use the 3 largest of the approximate (Saabas) ones,
  which also sum to the margin (computed by the compiled evaluator when it serves): exact SHAP of 20 rows of a
  500-tree model costs ~60 ms on one thread.
* :meth:`Ranker.save` writes ``model.ubj`` and ``metadata.json`` (version, config, training sizes, validation
  AUC, feature names, label horizon, ...) with atomic renames, so a worker that reloads never reads half a
  model; the version is ``xgb-<UTC YYYYmmddHHMMSS>-<first 8 hex of the model's sha256>``.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import xgboost as xgb

from pymk.learning import roc_auc
from pymk.model_artifact import read_metadata, write_artifact
from pymk.ranking.cascade import PREFILTER_FILE, CascadeConfig, Prefilter
from pymk.ranking.features import FEATURE_NAMES, N_FEATURES
from pymk.ranking.tree_eval import CompiledEvaluator, EvaluatorOptions, build_evaluator

MODEL_FILE = "model.ubj"


@dataclass(frozen=True)
class RankerConfig:
    objective: str = "binary:logistic"
    n_estimators: int = 500
    max_depth: int = 6
    learning_rate: float = 0.05
    subsample: float = 0.8
    colsample_bytree: float = 0.8
    min_child_weight: float = 1.0
    tree_method: str = "hist"
    eval_metric: tuple[str, ...] = ("logloss", "auc")  # the last one drives early stopping
    early_stopping_rounds: int | None = 50  # None: always grow n_estimators trees
    list_metric_every: int = 10  # trees between two evaluations of a ListMetric (a full pass over the lists)
    # What early stopping watches when the caller has validation lists: "auc" (of the sampled rows) or
    # "recall@20" (of the whole lists). AUC by default: on CollegeMsg's 335 validation lists Recall@20 is so
    # noisy that it stopped at 10 trees (future Recall@20 0.098 against 0.147 with AUC's 167 trees).
    stop_on: str = "auc"
    # The common-neighbour structure columns (STRUCTURE_FEATURES): "validate" trains with and without them and
    # keeps the model with the better Recall@20 on the validation lists (ties: without); "keep" / "drop" decide
    # outright. Dropped columns are NaN in training, so no tree splits on them: the input width stays the same.
    structure_columns: str = "validate"
    # The leaves' least hessian mass, chosen on the validation lists' Recall@20 among these (train_ranker; ties:
    # the first); one choice: that one; () or no validation lists: min_child_weight. Positives are few (a few
    # thousand rows), and how much a leaf must hold before it may say something differs by graph: on Digg replies
    # 50 validated better than 1 (0.0294 vs 0.0242), on CollegeMsg and ego-Facebook 1 did (docs/evaluation.md).
    min_child_weight_choices: tuple[float, ...] = (1.0, 50.0)
    seed: int = 0
    train_threads: int = 2  # the machine's cores; training is offline
    predict_threads: int = 1  # the worker ranks on one thread per partition
    # the pre-ranker that passes a long list's best rows to the full model (ranking/cascade.py; train_ranker fits
    # it and keeps it only where the validation lists' top 20 hold)
    cascade: CascadeConfig = field(default_factory=CascadeConfig)

    def __post_init__(self) -> None:
        if self.stop_on not in ("auc", "recall@20"):
            raise ValueError(f"stop_on must be 'auc' or 'recall@20', not {self.stop_on!r}")
        if self.structure_columns not in ("validate", "keep", "drop"):
            raise ValueError(f"structure_columns must be 'validate', 'keep' or 'drop', not {self.structure_columns!r}")
        if any(not weight >= 0 for weight in (self.min_child_weight, *self.min_child_weight_choices)):
            raise ValueError("min_child_weight and its choices must be non-negative")

    def params(self) -> dict[str, Any]:
        return {
            "objective": self.objective,
            "max_depth": self.max_depth,
            "eta": self.learning_rate,
            "subsample": self.subsample,
            "colsample_bytree": self.colsample_bytree,
            "min_child_weight": self.min_child_weight,
            "tree_method": self.tree_method,
            "eval_metric": list(self.eval_metric),
            "seed": self.seed,
            "nthread": self.train_threads,
        }


class ListMetric(Protocol):
    """A ranking metric over whole validation lists (e.g. Recall@20 over every Stage 1 candidate of each
    validation query): ``features`` stacks the rows of every list, calling it with their scores gives the metric
    (higher is better)."""

    features: np.ndarray

    def __call__(self, scores: np.ndarray) -> float: ...


@dataclass(frozen=True)
class HeuristicFloor:
    """Scores a reference heuristic adds to (blend) or replaces (fallback, ``weight`` None) the trees' margin
    with: ``h(x) = log1p(max(x[column], 0) / scale)`` (missing → 0), monotone in the heuristic, so the fallback
    orders a list exactly as the heuristic does. ``scale`` puts h on the margin's scale (the column's mean over
    the positive training rows)."""

    heuristic: str  # its name in the evaluation ("RA", "popularity", ...)
    column: str  # a FEATURE_NAMES column
    scale: float
    weight: float | None  # None: the heuristic alone

    def __post_init__(self) -> None:
        if self.column not in FEATURE_NAMES or not self.scale > 0:
            raise ValueError(f"a heuristic floor needs a feature column and a positive scale: {self}")

    def values(self, features: np.ndarray) -> np.ndarray:
        column = np.nan_to_num(np.asarray(features[:, FEATURE_NAMES.index(self.column)], np.float64), nan=0.0)
        return np.log1p(np.maximum(column, 0.0) / self.scale)

    @property
    def decision(self) -> str:
        return "fallback" if self.weight is None else "blend"


class _ListMetricStopping(xgb.callback.TrainingCallback):
    """Early stopping on a :class:`ListMetric`: every ``every`` trees, the margins of the trees added since the
    last look are added to a running sum (each block's constant base score shifts every row alike, which no
    ranking sees), the metric is evaluated on it, and training stops ``patience`` trees after the best."""

    def __init__(self, metric: ListMetric, every: int, patience: int | None) -> None:
        self.metric = metric
        self.every = max(1, every)
        self.patience = patience
        self.margin = np.zeros(len(metric.features), np.float64)
        self.summed = 0  # trees in self.margin
        self.best_value = -math.inf
        self.best_rounds = 0
        self.history: list[tuple[int, float]] = []

    def _look(self, model: xgb.Booster) -> None:
        rounds = model.num_boosted_rounds()
        if rounds <= self.summed:
            return
        self.margin += model.inplace_predict(self.metric.features, iteration_range=(self.summed, rounds),
                                             predict_type="margin", missing=np.nan)
        self.summed = rounds
        value = float(self.metric(self.margin))
        self.history.append((rounds, value))
        if value > self.best_value:  # ties keep the fewer trees
            self.best_value, self.best_rounds = value, rounds

    def after_iteration(self, model: xgb.Booster, epoch: int, evals_log: Any) -> bool:
        if model.num_boosted_rounds() - self.summed < self.every:
            return False
        self._look(model)
        return self.patience is not None and model.num_boosted_rounds() - self.best_rounds >= self.patience

    def after_training(self, model: xgb.Booster) -> xgb.Booster:
        self._look(model)
        return model


def _check_matrix(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features)
    if features.ndim != 2 or features.shape[1] != N_FEATURES:
        raise ValueError(f"expected (n, {N_FEATURES}) features, got {features.shape}")
    return features


def _model_version(raw: bytes, now: float | None = None) -> str:
    stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(now))
    return f"xgb-{stamp}-{hashlib.sha256(raw).hexdigest()[:8]}"


class Ranker:
    """A trained booster with its version and metadata; implements :class:`~pymk.ranking.source.Scorer`."""

    def __init__(self, booster: xgb.Booster, metadata: Mapping[str, Any],
                 evaluator_options: EvaluatorOptions | None = None, prefilter: Prefilter | None = None) -> None:
        self.booster = booster
        self.metadata = dict(metadata)
        # the cascade's pre-ranker (ranking/cascade.py): lists longer than its M are scored through it by
        # cascade.list_scores; None: every row by the full model
        self.prefilter = prefilter
        self.approximate_explanations = True  # see explain()
        self.booster.set_param({"nthread": int(self.metadata.get("predict_threads", 1))})
        self.evaluator_options = evaluator_options  # None: the PYMK_* environment's, read at prepare()
        self._compiled: CompiledEvaluator | None = None
        self._evaluator: str | None = None  # None until prepare()
        self._prepare_lock = threading.Lock()

    def prepare(self) -> str:
        """Convert the trees and load (compiling once per machine) the C evaluator; returns :attr:`evaluator`.
        Seconds the first time on a machine, ~tens of ms after: the worker calls it where it loads models (off
        the event loop on hot reload), offline code gets it at the first prediction."""
        with self._prepare_lock:
            if self._evaluator is None:
                options = self.evaluator_options or EvaluatorOptions.from_env()
                self._compiled, self._evaluator = build_evaluator(self.booster, options)
            return self._evaluator

    @property
    def evaluator(self) -> str:
        """"compiled-c", or "xgboost (why the compiled evaluator is not used)"."""
        return self._evaluator if self._evaluator is not None else self.prepare()

    @property
    def evaluator_kernel(self) -> str | None:
        """Which C kernel scores ("avx512", "avx2" or "portable"); None on XGBoost."""
        self.evaluator  # noqa: B018 - prepares when not yet done
        return self._compiled.kernel if self._compiled is not None else None

    def _evaluator_or_none(self) -> CompiledEvaluator | None:
        if self._evaluator is None:
            self.prepare()
        return self._compiled

    @property
    def version(self) -> str:
        return str(self.metadata["version"])

    @property
    def reads_structure_columns(self) -> bool:
        """False when training dropped the common-neighbour structure columns (validation, or the config): the
        trees were fitted with them missing, so no split reads them and the feature builder may skip them."""
        return (self.metadata.get("structure_columns") or {}).get("decision") != "dropped"

    @property
    def floor(self) -> HeuristicFloor | None:
        """The heuristic blended in or fallen back to (see :class:`HeuristicFloor`); None: the trees alone."""
        saved = self.metadata.get("floor")
        return None if not saved else HeuristicFloor(saved["heuristic"], saved["column"], float(saved["scale"]),
                                                     None if saved["weight"] is None else float(saved["weight"]))

    def with_floor(self, floor: HeuristicFloor | None, evidence: Mapping[str, Any] | None = None) -> Ranker:
        """This model serving ``floor`` too (a new object sharing the booster), the choice recorded in its
        metadata and in its version (``-blend-RA`` / ``-fallback-RA``), so lists say what ranked them."""
        metadata = {**self.metadata, "floor": None if floor is None else asdict(floor),
                    "floor_decision": "model" if floor is None else floor.decision}
        if evidence is not None:
            metadata["floor_evidence"] = dict(evidence)
        base_version = str(self.metadata.get("trees_version", self.metadata["version"]))
        metadata["trees_version"] = base_version
        metadata["version"] = base_version if floor is None else f"{base_version}-{floor.decision}-{floor.heuristic}"
        metadata.pop("cascade", None)  # a pre-ranker fitted to the margins without the floor: fitted again after
        ranker = Ranker(self.booster, metadata, self.evaluator_options)
        return ranker

    def with_prefilter(self, prefilter: Prefilter, evidence: Mapping[str, Any]) -> Ranker:
        """This model serving through the cascade of ``prefilter`` (a new object sharing the booster); its version
        says so (``-cascade<M>``), since a list longer than M then gets other scores (ranking/cascade.py)."""
        metadata = {**self.metadata, "cascade": dict(evidence)}
        metadata["trees_version"] = self.metadata.get("trees_version", self.metadata["version"])
        metadata["version"] = f"{self.metadata['version']}-cascade{prefilter.candidates}"
        return Ranker(self.booster, metadata, self.evaluator_options, prefilter)

    def _trees_margin(self, features: np.ndarray) -> np.ndarray:
        compiled = self._evaluator_or_none()
        if compiled is not None:
            return compiled.margin(features)
        return self.booster.inplace_predict(features, predict_type="margin", missing=np.nan)

    # ---- training ------------------------------------------------------------------------------------------------
    @classmethod
    def train(cls, features: np.ndarray, labels: np.ndarray, val_features: np.ndarray | None = None,
              val_labels: np.ndarray | None = None, config: RankerConfig | None = None,
              extra_metadata: Mapping[str, Any] | None = None, weights: np.ndarray | None = None,
              val_weights: np.ndarray | None = None, base: Ranker | None = None,
              list_metric: ListMetric | None = None) -> Ranker:
        """Fit on (features, labels); with a validation split, stop early on it and keep the best trees.
        ``list_metric``: stop on it instead (every ``config.list_metric_every`` trees; the best count of trees
        wins, ties to the fewer), and record its curve in the metadata.
        ``extra_metadata`` (label horizon, data path, ...) is stored in the metadata as is. ``weights`` /
        ``val_weights``: per-row weights (e.g. of sampled negatives, see :mod:`pymk.ranking.training_data`).
        ``base``: continue boosting from this model (its trees kept, up to ``n_estimators`` new ones fitted to
        what it gets wrong on these rows) — how a model learns from a little fresh traffic without forgetting
        what it learned from much more data before."""
        config = config or RankerConfig()
        features = _check_matrix(features)
        labels = np.asarray(labels, np.float32)
        train_matrix = xgb.DMatrix(features, label=labels, weight=weights, feature_names=list(FEATURE_NAMES),
                                   missing=np.nan)
        evals: list[tuple[xgb.DMatrix, str]] = []
        has_val = val_features is not None and val_labels is not None and len(val_labels) > 0
        if has_val:
            val_matrix = xgb.DMatrix(_check_matrix(val_features), label=np.asarray(val_labels, np.float32),
                                     weight=val_weights, feature_names=list(FEATURE_NAMES), missing=np.nan)
            evals = [(val_matrix, "val")]
        # Early stopping needs both classes in the validation split (AUC is undefined otherwise).
        can_stop = has_val and config.early_stopping_rounds and len(np.unique(np.asarray(val_labels))) == 2
        started = time.perf_counter()
        if base is not None and list(base.metadata.get("feature_names", [])) != list(FEATURE_NAMES):
            raise ValueError(f"cannot continue {base.version}: it was trained on other features")
        stopping = None if list_metric is None or not len(list_metric.features) else _ListMetricStopping(
            list_metric, config.list_metric_every, config.early_stopping_rounds)
        booster = xgb.train(config.params(), train_matrix, num_boost_round=config.n_estimators, evals=evals,
                            early_stopping_rounds=config.early_stopping_rounds if can_stop and not stopping else None,
                            verbose_eval=False, xgb_model=base.booster.copy() if base is not None else None,
                            callbacks=[stopping] if stopping is not None else None)
        train_seconds = time.perf_counter() - started
        if stopping is not None:
            best_iteration = stopping.best_rounds - 1
        else:
            best_iteration = booster.best_iteration if can_stop else booster.num_boosted_rounds() - 1
        if best_iteration + 1 < booster.num_boosted_rounds():
            booster = booster[: best_iteration + 1]
        booster.set_param({"nthread": config.train_threads})
        val_auc = val_logloss = math.nan
        if has_val:
            val_scores = booster.inplace_predict(np.asarray(val_features))
            val_auc = roc_auc(np.asarray(val_labels), val_scores)
            clipped = np.clip(val_scores, 1e-15, 1 - 1e-15)
            truth = np.asarray(val_labels, np.float64)
            val_logloss = float(-np.mean(truth * np.log(clipped) + (1 - truth) * np.log(1 - clipped)))
        raw = bytes(booster.save_raw("ubj"))
        metadata: dict[str, Any] = {
            "version": _model_version(raw),
            "created_at_ms": int(time.time() * 1000),
            "feature_names": list(FEATURE_NAMES),
            "config": {**asdict(config), "eval_metric": list(config.eval_metric)},
            "predict_threads": config.predict_threads,
            "training": {"rows": int(len(labels)), "positives": int(labels.sum()),
                         "val_rows": int(len(val_labels)) if has_val else 0,
                         "val_positives": int(np.sum(val_labels)) if has_val else 0,
                         "seconds": round(train_seconds, 3)},
            "trees": int(booster.num_boosted_rounds()),
            "best_iteration": int(best_iteration),
            "val_auc": None if math.isnan(val_auc) else val_auc,
            "val_logloss": None if math.isnan(val_logloss) else val_logloss,
            "xgboost": xgb.__version__,
        }
        if stopping is not None:
            metadata["stopped_on"] = "list metric"
            metadata["val_list_metric"] = stopping.best_value
            metadata["val_list_metric_curve"] = [[rounds, round(value, 6)] for rounds, value in stopping.history]
        if base is not None:
            metadata["continued_from"] = base.version
            metadata["base_trees"] = int(base.booster.num_boosted_rounds())
        metadata.update(extra_metadata or {})
        return cls(booster, metadata)

    # ---- scoring ------------------------------------------------------------------------------------------------
    def predict(self, features: np.ndarray) -> np.ndarray:
        """Probabilities of connecting, (n,) (with a floor: the sigmoid of the floored margin)."""
        features = _check_matrix(features)
        if len(features) == 0:
            return np.empty(0, np.float32)
        if self.floor is not None:
            return (1.0 / (1.0 + np.exp(-self.margin(features).astype(np.float64)))).astype(np.float32)
        compiled = self._evaluator_or_none()
        if compiled is not None:
            return compiled.predict(features)
        return self.booster.inplace_predict(features, missing=np.nan)

    def margin(self, features: np.ndarray) -> np.ndarray:
        """Log-odds, (n,) (with a floor: the trees' margin plus weight · h, or h alone)."""
        features = _check_matrix(features)
        if len(features) == 0:
            return np.empty(0, np.float32)
        floor = self.floor
        if floor is None:
            return self._trees_margin(features)
        if floor.weight is None:
            return floor.values(features).astype(np.float32)
        return (self._trees_margin(features).astype(np.float64) + floor.weight * floor.values(features)
                ).astype(np.float32)

    def contributions(self, features: np.ndarray, approximate: bool = False) -> np.ndarray:
        """(n, 18) contributions to the margin: the 17 features then the bias; each row sums to its margin.

        Exact TreeSHAP by default. ``approximate``: XGBoost's ``approx_contribs`` (Saabas: the change of the
        expected value along each row's decision path), which also sums to the margin and is ~50x faster:
        with 500 depth-6 trees on one thread, exact SHAP of 20 rows takes ~64 ms, Saabas ~1.3 ms.
        """
        features = _check_matrix(features)
        if len(features) == 0:
            return np.empty((0, N_FEATURES + 1), np.float32)
        floor = self.floor
        if floor is not None:  # the heuristic's term belongs to its column, so the rows still sum to the margin
            column = FEATURE_NAMES.index(floor.column)
            if floor.weight is None:
                out = np.zeros((len(features), N_FEATURES + 1), np.float32)
                out[:, column] = floor.values(features)
                return out
            out = self._tree_contributions(features, approximate).copy()
            out[:, column] += (floor.weight * floor.values(features)).astype(out.dtype)
            return out
        return self._tree_contributions(features, approximate)

    def _tree_contributions(self, features: np.ndarray, approximate: bool) -> np.ndarray:
        compiled = self._evaluator_or_none() if approximate else None
        if compiled is not None:
            return compiled.contributions(features)  # the same values (float32, bit for bit in our tests), ~6x faster
        # nthread=1: building even a 20-row DMatrix with the default (all cores) costs milliseconds at p99.
        matrix = xgb.DMatrix(features, feature_names=list(FEATURE_NAMES), missing=np.nan,
                             nthread=int(self.metadata.get("predict_threads", 1)))
        return self.booster.predict(matrix, pred_contribs=True, approx_contribs=approximate)

    def explain(self, features: np.ndarray) -> np.ndarray:
        """Per-feature contributions for the reasons: the approximate (Saabas) ones, since exact TreeSHAP of
        the 20 shown rows alone would cost several times the whole ranking budget (see :meth:`contributions`)."""
        return self.contributions(features, approximate=self.approximate_explanations)[:, :N_FEATURES]

    def feature_importances(self) -> dict[str, float]:
        """XGBoost's "gain" importance (average loss reduction of the splits on a feature; 0 for unused
        features), in FEATURE_NAMES order."""
        gains = self.booster.get_score(importance_type="gain")
        return {name: float(gains.get(name, 0.0)) for name in FEATURE_NAMES}

    def describe(self) -> str:
        meta = self.metadata
        training = meta.get("training", {})
        auc = meta.get("val_auc")
        lines = [
            f"model {self.version}: {meta.get('trees')} trees (best iteration {meta.get('best_iteration')}), "
            f"depth {meta.get('config', {}).get('max_depth')}",
            f"training rows {training.get('rows')} ({training.get('positives')} positive), "
            f"validation rows {training.get('val_rows')} ({training.get('val_positives')} positive), "
            f"validation AUC {'n/a' if auc is None else f'{auc:.4f}'}",
        ]
        if "label_horizon" in meta:
            lines.append(f"label horizon {meta['label_horizon']}")
        cascade = meta.get("cascade") or {}
        if cascade:
            config = cascade.get("config") or {}
            share = cascade.get("top20_equal_share")
            lines.append(f"cascade {cascade.get('decision')}: {config.get('trees')} depth-{config.get('max_depth')} "
                         f"trees pass {cascade.get('candidates', 'no')} rows; validation top 20 equal in "
                         f"{'n/a' if share is None else f'{share:.4f}'} of {cascade.get('lists_longer_than_m')} lists"
                         + (f" ({cascade['why']})" if cascade.get("why") else ""))
        importances = self.feature_importances()
        total = sum(importances.values()) or 1.0
        lines.append("feature importance (gain, as a share of the sum over features):")
        for name, gain in sorted(importances.items(), key=lambda item: (-item[1], item[0])):
            lines.append(f"  {name:32s} {gain / total:7.2%}  {'#' * round(40 * gain / total)}")
        return "\n".join(lines)

    # ---- persistence -----------------------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write the model and its metadata into ``directory`` (created when missing); returns it."""
        # the layout of every saved model (pymk/model_artifact.py): atomic writes, the metadata (its version) last
        files = {MODEL_FILE: bytes(self.booster.save_raw("ubj"))}
        if self.prefilter is not None:
            files[PREFILTER_FILE] = self.prefilter.raw()
        return write_artifact(directory, files, self.metadata, sort_keys=False)

    @classmethod
    def load(cls, directory: str | Path, evaluator_options: EvaluatorOptions | None = None) -> Ranker:
        """The saved model, its evaluator prepared (see :meth:`prepare`)."""
        directory = Path(directory)
        metadata = read_metadata(directory)
        if list(metadata.get("feature_names", [])) != list(FEATURE_NAMES):
            raise ValueError(f"{directory}: the model was trained on other features: {metadata.get('feature_names')}")
        booster = xgb.Booster()
        booster.load_model(bytearray((directory / MODEL_FILE).read_bytes()))
        prefilter = None
        cascade = metadata.get("cascade") or {}
        if cascade.get("decision") == "on":
            prefilter = Prefilter.from_raw((directory / PREFILTER_FILE).read_bytes(), cascade["candidates"],
                                           evaluator_options)
        ranker = cls(booster, metadata, evaluator_options, prefilter)
        ranker.prepare()
        return ranker
