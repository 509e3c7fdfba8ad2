"""The row "hybrid+XGBoost+cross-attention" of ``pymk evaluate``: the product's hybrid+XGBoost order with its top
50 re-ranked by the cross-attention model (:mod:`pymk.ranking.cross_attention`); the rest keeps XGBoost's order.

No leakage: the re-ranker is trained on the split's past only, on the same replay as the product's XGBoost ranker
(temporal for a time split, the holdout folds of the same hidden pairs for a random one), with that ranker
choosing each replay list's top 50 and the product's GraphSAGE model (trained on the first half of the past, or on
the visible 80 % of it) giving the embedding inputs. The future is used only to score.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Collection
from dataclasses import replace
from pathlib import Path

import numpy as np

from pymk.datasets import EdgeHistory
from pymk.index.sage import load_model
from pymk.ranking.cross_attention import CrossAttentionRanker, load_cross_attention, rerank_top
from pymk.ranking.cross_attention_training import RerankerTrainingConfig, train_reranker
from pymk.ranking.evaluation import EvaluationSplit
from pymk.ranking.model import Ranker
from pymk.ranking.product import ProductMethod, ProductModels, past_history, ranker_training_config
from pymk.reproducible import config_digest

ROW = "hybrid+XGBoost+cross-attention"
MARKER_FILE = "reranker.json"


def evaluation_config(split: EvaluationSplit, models: ProductModels, progress: bool = False,
                      max_queries: int | None = None) -> RerankerTrainingConfig:
    """The re-ranker's training task mirrors the split's, as the XGBoost ranker's does (a temporal replay for a
    time split, its holdout replay with the same hidden pairs and folds for a random one); embedding inputs of the
    product's GraphSAGE width."""
    sage, _ = load_model(models.sage_dir)
    data = ranker_training_config(split)
    base = RerankerTrainingConfig(progress=progress, replay=data.replay, holdout_fraction=data.holdout_fraction,
                                  holdout_folds=data.holdout_folds, holdout_seed=data.seed)
    if max_queries is not None:  # a cap for large graphs (pymk evaluate --reranker-queries): fewer, cheaper lists
        base = replace(base, queries_per_checkpoint=min(base.queries_per_checkpoint, max_queries),
                       holdout_queries=min(base.holdout_queries, max_queries))
    return replace(base, model=replace(base.model, embedding_dim=sage.config.embedding_dim))


def cached_reranker(split: EvaluationSplit, history: EdgeHistory, models: ProductModels, cache_dir: Path,
                    retrain: bool = False, progress: bool = False, max_queries: int | None = None
                    ) -> tuple[Path, float]:
    """The re-ranker trained on the split's past (cached per product model versions and training config)."""
    from pymk.train import embeddings_at_checkpoint

    config = evaluation_config(split, models, progress, max_queries)
    # "metadata": 2 since the metadata holds the validation gain's standard error (an older model is retrained)
    key = {"sage": models.sage_version, "ranker": models.ranker_version, "config": config_digest(config),
           "metadata": 2}
    marker = cache_dir / MARKER_FILE
    if marker.exists() and not retrain and json.loads(marker.read_text()).get("key") == key:
        return cache_dir / "model", 0.0
    started = time.perf_counter()
    train_reranker(past_history(split, history), cache_dir / "model", config, Ranker.load(models.ranker_dir),
                   embeddings_at_checkpoint(models.sage_dir))
    marker.write_text(json.dumps({"key": key}))
    return cache_dir / "model", time.perf_counter() - started


class RerankedMethod:
    """A :class:`pymk.ranking.evaluation.Method`: ``base``'s full order with its top ``top_n`` re-ranked."""

    def __init__(self, base: ProductMethod, model: CrossAttentionRanker, name: str = ROW) -> None:
        self.name = name
        self.base = base
        self.model = model
        self._cache: dict[int, list[int]] = {}

    def _ordered(self, user: int) -> list[int]:
        held = self._cache.get(user)
        if held is None:
            ranked = self.base._ordered(user)[0]
            head = ranked[: self.model.config.top_n]
            scores = self.model.score_list(self.base.source, user, head)
            order = rerank_top(np.arange(len(ranked)), scores, len(head))
            held = self._cache[user] = [ranked[i] for i in order.tolist()]
            if len(self._cache) > 4096:
                self._cache.pop(next(iter(self._cache)))
        return held

    def rank(self, user: int, k: int) -> list[int]:
        return self._ordered(user)[:k]

    def candidates(self, user: int) -> Collection[int]:
        return self.base.candidates(user)

    def best_rank(self, user: int, targets: Collection[int]) -> int | None:
        for position, candidate in enumerate(self._ordered(user), start=1):
            if candidate in targets:
                return position
        return None


# A validation gain counts only this many paired standard errors clear of zero (as the heuristic floor's rule)
GAIN_STANDARD_ERRORS = 2.0


def reranker_validation(model_dir: Path) -> dict[str, object]:
    """What the re-ranker's own validation (inside the past) says: Recall@20 of Stage 2's order and of the
    re-ranked one on the validation lists, and the default it would pick: "cross-attention" only on a gain of more
    than :data:`GAIN_STANDARD_ERRORS` paired standard errors over the lists (the best epoch was itself picked on
    these lists; a model saved before the error was recorded needs only a gain)."""
    metadata = json.loads((Path(model_dir) / "metadata.json").read_text())
    before, after = metadata.get("stage2_val_recall_at_20"), metadata.get("val_recall_at_20")
    error = metadata.get("val_gain_standard_error")
    stats = metadata.get("data_stats") or {}
    margin = GAIN_STANDARD_ERRORS * error if isinstance(error, float) and math.isfinite(error) else 0.0
    gain = before is not None and after is not None and after - before > margin
    return {"version": metadata.get("version"), "val_recall_at_20_stage2": before, "val_recall_at_20": after,
            "val_gain_standard_error": error, "best_epoch": metadata.get("best_epoch"),
            "epochs_run": metadata.get("epochs_run"), "train_lists": stats.get("train_lists"),
            "val_lists": stats.get("val_lists"), "validation_picks": "cross-attention" if gain else "none"}


def reranker_method(base: ProductMethod, model_dir: Path) -> RerankedMethod:
    model, _ = load_cross_attention(model_dir)
    return RerankedMethod(base, model)
