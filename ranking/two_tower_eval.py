"""The two-tower rows of ``pymk evaluate``: "two-tower B1/B2/B3" and "blend (XGBoost+two-tower B2)".

Each row re-ranks the product's hybrid Stage 1 candidates (:func:`pymk.ranking.candidates.generate_candidates`
over :func:`pymk.ranking.product.past_source`, the same candidates as "hybrid+XGBoost") by the two-tower score,
or by the rank blend of it with the product's XGBoost scores (:func:`pymk.ranking.two_tower.blend_scores`).
Ties: higher past degree, then lower id (the protocol's rule).

No leakage: the towers are trained on the split's past only, with the product's GraphSAGE model (trained on
the first half of the past) frozen, and an inner split of the past (time: the last 10 % of the past validates,
training snapshots before it; random: random held-out folds) — see :mod:`pymk.ranking.two_tower`. The future
is used only to score.

Wiring into ``pymk evaluate`` (``run_evaluation``, after ``product_methods``)::

    tower_models, tower_seconds = cached_two_tower_models(split, models, cache_dir / "two-tower", retrain, progress)
    methods += two_tower_methods(split, models, tower_models, ann)
    timings["train_two_tower"] = tower_seconds

or run ``python -m pymk.bench.two_tower_eval --data FILE --split time`` (all rows, same report format).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from pymk.index.ann import AnnConfig
from pymk.index.sage import load_model
from pymk.ranking.candidates import CandidateConfig, generate_candidates
from pymk.ranking.evaluation import EvaluationSplit
from pymk.ranking.features import FEATURE_INDEX, FeatureBuilder
from pymk.ranking.memory_source import MemorySource
from pymk.ranking.model import Ranker
from pymk.ranking.product import OrderedCandidatesMethod, ProductModels, past_source
from pymk.ranking.recommend import score_candidates
from pymk.ranking.source import Scorer
from pymk.ranking.two_tower import (
    LOSSES,
    TwoTowerConfig,
    TwoTowerModel,
    TwoTowerRanker,
    blend_scores,
    load_two_tower,
    tower_inputs,
    train_two_tower,
)
from pymk.reproducible import config_digest

BLEND_LOSS = "B2"
BLEND_WEIGHT = 0.5  # weight of the two-tower rank in the blend (not tuned: the evaluation must not pick it)
MARKER_FILE = "two_tower.json"


@dataclass(frozen=True)
class TwoTowerModels:
    model_dirs: dict[str, Path]  # loss → saved model directory
    versions: dict[str, str]
    sage_version: str
    metadata: dict[str, dict[str, Any]]  # loss → summary (val AUC, time, epochs)


def train_two_tower_models(split: EvaluationSplit, models: ProductModels, out_dir: Path,
                           losses: Sequence[str] = LOSSES, config: TwoTowerConfig | None = None,
                           progress: bool = False) -> TwoTowerModels:
    """Towers for each loss, trained on the split's past with the product's GraphSAGE model (see the module doc)."""
    base = config or TwoTowerConfig(progress=progress)
    dirs, versions, summaries = {}, {}, {}
    for loss in losses:
        result = train_two_tower(split.past_connections, None, models.sage_dir, out_dir / loss,
                                 replace(base, loss=loss, split=split.kind))  # type: ignore[arg-type]
        dirs[loss], versions[loss] = result.model_dir, str(result.metadata["version"])
        summaries[loss] = {key: result.metadata[key] for key in (
            "best_val_auc", "best_val_auc_seen", "best_epoch", "epochs_run", "wall_seconds", "train_edges",
            "val_edges")}
    return TwoTowerModels(dirs, versions, models.sage_version, summaries)


def cached_two_tower_models(split: EvaluationSplit, models: ProductModels, cache_dir: Path, retrain: bool = False,
                            progress: bool = False) -> tuple[TwoTowerModels, float]:
    """:func:`train_two_tower_models` unless ``cache_dir`` holds models trained with the same GraphSAGE version
    (its weights digest, and the cache folder is keyed by the data and split) and tower config; returns them
    and the training seconds (0 from the cache)."""
    marker = cache_dir / MARKER_FILE
    if marker.exists() and not retrain:
        data = json.loads(marker.read_text())
        if (data["sage_version"] == models.sage_version and set(data["model_dirs"]) >= set(LOSSES)
                and data.get("config") == config_digest(TwoTowerConfig())):
            return TwoTowerModels({k: Path(v) for k, v in data["model_dirs"].items()}, data["versions"],
                                  data["sage_version"], data["metadata"]), 0.0
    started = time.perf_counter()
    cache_dir.mkdir(parents=True, exist_ok=True)
    trained = train_two_tower_models(split, models, cache_dir, progress=progress)
    marker.write_text(json.dumps({"model_dirs": {k: str(v) for k, v in trained.model_dirs.items()},
                                  "versions": trained.versions, "sage_version": trained.sage_version,
                                  "metadata": trained.metadata, "config": config_digest(TwoTowerConfig())},
                                 indent=2, default=str))
    return trained, time.perf_counter() - started


class TwoTowerMethod(OrderedCandidatesMethod):
    """A :class:`pymk.ranking.evaluation.Method`: a user's hybrid Stage 1 candidates ordered by the two-tower
    score, or (with ``xgb``) by ``blend_scores(xgb, two-tower, weight)``. The past source does not change during
    an evaluation, so every user's query and candidate vectors are computed once, in one batch."""

    def __init__(self, name: str, source: MemorySource, model: TwoTowerModel, config: CandidateConfig,
                 as_of_ms: int, xgb: Scorer | None = None, weight: float = BLEND_WEIGHT) -> None:
        super().__init__()
        self.name = name
        self.source = source
        self.ranker = TwoTowerRanker(model)
        self.config = config
        self.as_of_ms = as_of_ms
        self.xgb = xgb
        self.weight = weight
        self.builder = FeatureBuilder()
        users = np.asarray(sorted(source.users()), dtype=np.int64)
        self._row = {int(user): i for i, user in enumerate(users.tolist())}
        inputs = tower_inputs(users, source)
        self._queries = model.query_vectors(inputs)
        self._candidates = model.candidate_vectors(inputs)

    def scores(self, user: int, ids: np.ndarray) -> np.ndarray:
        """Two-tower scores of ``ids`` for ``user`` (equal to ``TwoTowerRanker.score`` on the same source)."""
        rows = [self._row[int(c)] for c in ids]
        return (self._candidates[rows] @ self._queries[self._row[user]]).astype(np.float64)

    def scored(self, user: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.xgb is None:
            ids = generate_candidates(user, self.source, self.config, self.as_of_ms).ids
            degree_key = np.log1p(np.fromiter((self.source.degree(int(c)) for c in ids), np.float64, len(ids)))
            return ids, self.scores(user, ids), degree_key
        scored = score_candidates(user, self.source, self.xgb, self.config, self.as_of_ms, k=1, builder=self.builder)
        ids = scored.candidates.ids
        return (ids, blend_scores(scored.scores, self.scores(user, ids), self.weight),
                scored.features[:, FEATURE_INDEX["candidate_degree_log"]])


def two_tower_methods(split: EvaluationSplit, models: ProductModels, tower_models: TwoTowerModels, ann: AnnConfig,
                      candidate_config: CandidateConfig | None = None, source: MemorySource | None = None,
                      blend_weight: float = BLEND_WEIGHT, with_blend: bool = True) -> list[TwoTowerMethod]:
    """Rows "two-tower B1", "two-tower B2", "two-tower B3" and "blend (XGBoost+two-tower B2)" (losses missing
    from ``tower_models`` are skipped). ``source``: a :func:`past_source` already built for the product rows."""
    config = candidate_config or CandidateConfig()
    if source is None:
        sage, _ = load_model(models.sage_dir)
        source = past_source(split, sage, models.sage_version, ann)
    as_of = max(ts for _, _, ts in split.past_connections) + 1
    methods = []
    loaded = {loss: load_two_tower(directory)[0] for loss, directory in tower_models.model_dirs.items()}
    for loss in LOSSES:
        if loss in loaded:
            methods.append(TwoTowerMethod(f"two-tower {loss}", source, loaded[loss], config, as_of))
    if with_blend and BLEND_LOSS in loaded:
        methods.append(TwoTowerMethod(f"blend (XGBoost+two-tower {BLEND_LOSS})", source, loaded[BLEND_LOSS], config,
                                      as_of, xgb=Ranker.load(models.ranker_dir), weight=blend_weight))
    return methods
