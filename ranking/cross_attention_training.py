"""Training of the cross-attention re-ranker (:mod:`pymk.ranking.cross_attention`): ``pymk train reranker``.

**Data: the same temporal replay as the XGBoost ranker** (:mod:`pymk.ranking.training_data`): checkpoints at
50-90 % of the connections, labels = connections within the horizon after each checkpoint. At a checkpoint t
every event before t (and nothing else) is in a :class:`MemorySource`; for each sampled active user the Stage 2
scorer (the XGBoost ranker in use, or the heuristic) orders the Stage 1 candidates and its top 50 is the list;
the re-ranker learns a listwise softmax over it (the other 49 are hard negatives: Stage 2 liked them). Lists
without a positive in the top 50 teach nothing listwise and are left out of training.

**Leakage guard.** Tokens (subgraph samples and node inputs) are built at the checkpoint, from the past-only
source, right after :func:`pymk.ranking.training_data.check_no_leakage` checked it holds no event at or after t:
a later event can never reach a training example (the test replays a graph whose labels would be visible).

**Validation**: the lists of the last checkpoint; the number is Recall@20 over the full future partner set (the
replay's definition), top 20 of the re-ranked top 50, next to Stage 2's own top 20 on the same lists. Early
stopping on it (best epoch kept). Untimed data (holdout replay) is not supported yet.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pymk.datasets import EdgeHistory
from pymk.events import InputEvent
from pymk.index.embedder import salt_for_version
from pymk.ranking.candidates import CandidateConfig
from pymk.ranking.cross_attention import (
    CrossAttentionConfig,
    CrossAttentionRanker,
    ListTokens,
    build_list_tokens,
    listwise_loss,
    make_batch,
    save_model,
)
from pymk.ranking.heuristic import HeuristicScorer
from pymk.ranking.recommend import score_candidates
from pymk.ranking.source import Scorer
from pymk.ranking.training_data import (
    DAY_MS,
    EmbeddingsAt,
    check_no_leakage,
    history_events,
    new_connections,
    replay_checkpoints,
)
from pymk.reproducible import config_digest, deterministic


@dataclass(frozen=True)
class RerankerTrainingConfig:
    model: CrossAttentionConfig = field(default_factory=CrossAttentionConfig)
    horizon_days: float = 14.0
    checkpoint_fractions: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)  # the XGBoost replay's checkpoints
    queries_per_checkpoint: int = 200  # half the XGBoost replay's: a list costs ~50x a row to train on
    candidate_config: CandidateConfig = field(default_factory=CandidateConfig)
    epochs: int = 8
    patience: int = 3
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    lists_per_step: int = 16
    seed: int = 0
    threads: int = 2  # fixed: BLAS splits float sums by thread count, so another count gives other weights
    progress: bool = False


@dataclass(frozen=True)
class RerankList:
    user: int
    checkpoint: int
    ids: np.ndarray  # the Stage 2 top n, in Stage 2's order
    labels: np.ndarray  # float32: connects within the horizon
    partners: int  # future partners already in the graph at t (the recall denominator)
    tokens: ListTokens


@dataclass(frozen=True)
class RerankData:
    train: list[RerankList]
    val: list[RerankList]
    stats: dict[str, Any]


def build_rerank_data(events: Sequence[InputEvent] | EdgeHistory, config: RerankerTrainingConfig, salt: int,
                      scorer: Scorer | None = None, embeddings_at: EmbeddingsAt | None = None) -> RerankData:
    """Lists of the temporal replay (see the module doc); the last checkpoint validates."""
    scorer = scorer or HeuristicScorer()
    if isinstance(events, EdgeHistory):
        if not events.timed:
            raise ValueError("the re-ranker trains on a temporal replay: untimed edge lists are not supported yet")
        events = history_events(events)
    connections = new_connections(events)
    if len(connections) < 2:
        raise ValueError("need at least two connections to replay")
    checkpoints = sorted({connections[int(f * len(connections))][2] for f in config.checkpoint_fractions})
    horizon_ms = int(config.horizon_days * DAY_MS)
    rng = np.random.default_rng(config.seed)
    train: list[RerankList] = []
    val: list[RerankList] = []
    per_checkpoint = []
    started = time.perf_counter()
    bar = _bar(len(checkpoints) * config.queries_per_checkpoint, config.progress, "replay", "query")
    for t, source, future in replay_checkpoints(events, connections, checkpoints, horizon_ms, embeddings_at):
        active = sorted(u for u in source.users() if source.degree(u) > 0 and u in future)
        queries = rng.permutation(active)[: config.queries_per_checkpoint].tolist()
        is_val = t == checkpoints[-1] and len(checkpoints) > 1
        kept = 0
        for user in queries:
            check_no_leakage(source, t)  # the guard: every token below comes from this past-only source
            scored = score_candidates(user, source, scorer, config.candidate_config, t, config.model.top_n)
            ids = scored.candidates.ids[scored.top]
            partners = future[user]
            labels = np.isin(ids, np.fromiter(partners, np.int64, len(partners))).astype(np.float32)
            known = sum(1 for p in partners if source.degree(p) > 0)
            bar.update(1)
            if not len(ids) or not known or (not is_val and not labels.any()):
                continue
            tokens = build_list_tokens(source, user, ids, salt, config.model)
            (val if is_val else train).append(RerankList(user, t, ids, labels, known, tokens))
            kept += 1
        per_checkpoint.append({"t": t, "queries": len(queries), "active": len(active), "lists": kept})
    bar.close()
    stats = {"checkpoints": per_checkpoint, "train_lists": len(train), "val_lists": len(val),
             "train_positives": int(sum(r.labels.sum() for r in train)), "scorer": scorer.version,
             "seconds": round(time.perf_counter() - started, 2)}
    return RerankData(train, val, stats)


def recall_at(lists: Sequence[RerankList], scores: Sequence[np.ndarray] | None, k: int = 20) -> float:
    """Mean Recall@k of the lists re-ranked by ``scores`` (None: Stage 2's order)."""
    values = []
    for i, item in enumerate(lists):
        order = np.arange(len(item.ids)) if scores is None else np.argsort(-scores[i], kind="stable")
        values.append(float(item.labels[order[:k]].sum()) / item.partners)
    return float(np.mean(values)) if values else math.nan


@torch.no_grad()
def score_lists(model: CrossAttentionRanker, lists: Sequence[RerankList], chunk: int = 32) -> list[np.ndarray]:
    model.eval()
    out: list[np.ndarray] = []
    for start in range(0, len(lists), chunk):
        part = lists[start:start + chunk]
        scores = model(make_batch([item.tokens for item in part])).double().numpy()
        offsets = np.cumsum([0] + [item.tokens.pairs for item in part])
        out += [scores[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    return out


@dataclass(frozen=True)
class RerankerResult:
    model: CrossAttentionRanker
    model_dir: Path
    metadata: dict[str, Any]


def training_version(config: RerankerTrainingConfig, data_end_ms: int) -> str:
    """Fixed before training (its hash salts the sampler, so training and serving see the same tokens): the
    data's end and the settings' digest."""
    when = datetime.fromtimestamp(max(data_end_ms, 0) / 1000, UTC)
    return f"xattn-{when:%Y%m%d%H%M%S}-{config_digest(config)[:8]}"


def train_reranker(events: Sequence[InputEvent] | EdgeHistory, out_dir: Path | str,
                   config: RerankerTrainingConfig | None = None, scorer: Scorer | None = None,
                   embeddings_at: EmbeddingsAt | None = None) -> RerankerResult:
    """Replay, train with early stopping on validation Recall@20, save model + metadata + curve PNG."""
    config = config or RerankerTrainingConfig()
    out_dir = Path(out_dir)
    all_events = history_events(events) if isinstance(events, EdgeHistory) else events
    end = max((e.ts for e in all_events), default=0)
    version = training_version(config, end)
    salt = salt_for_version(version)
    data = build_rerank_data(events, config, salt, scorer, embeddings_at)
    if not data.train or not data.val:
        raise ValueError(f"the re-ranker needs training and validation lists ({data.stats})")
    started = time.perf_counter()
    with deterministic(config.seed, config.threads):
        model = CrossAttentionRanker(config.model)
        optimiser = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
        rng = np.random.default_rng(config.seed)
        steps = math.ceil(len(data.train) / config.lists_per_step)
        bar = _bar(config.epochs * steps, config.progress, "train reranker", "step")
        curve: list[dict[str, float]] = []
        best = (-1.0, 0, copy.deepcopy(model.state_dict()))
        for epoch in range(1, config.epochs + 1):
            model.train()
            order = rng.permutation(len(data.train))
            losses = []
            for step in range(steps):
                part = [data.train[i] for i in order[step * config.lists_per_step:(step + 1) * config.lists_per_step]]
                scores = model(make_batch([item.tokens for item in part]))
                labels = torch.from_numpy(np.concatenate([item.labels for item in part]))
                loss = listwise_loss(scores, labels, [item.tokens.pairs for item in part])
                optimiser.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimiser.step()
                losses.append(float(loss.detach()))
                bar.update(1)
            recall = recall_at(data.val, score_lists(model, data.val))
            curve.append({"epoch": epoch, "loss": float(np.mean(losses)), "val_recall_at_20": recall})
            if recall > best[0]:
                best = (recall, epoch, copy.deepcopy(model.state_dict()))
            elif epoch - best[1] >= config.patience:
                break
        bar.close()
        model.load_state_dict(best[2])
        model.eval()
    model.version = version
    stage2 = recall_at(data.val, None)
    png = out_dir / "curve.png"
    metadata = {"version": version, "best_epoch": best[1], "epochs_run": len(curve), "curve": curve,
                "val_recall_at_20": best[0], "stage2_val_recall_at_20": stage2,
                "data_stats": data.stats, "train_seconds": round(time.perf_counter() - started, 2),
                "seed": config.seed, "training_config": config_digest(config), "curve_png": str(png),
                "leakage": "tokens built at each checkpoint from a source holding only events before it"}
    save_model(model, out_dir, metadata)
    _plot(curve, stage2, png)
    return RerankerResult(model, out_dir, metadata)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(total: int, enabled: bool, desc: str, unit: str) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False)


def _plot(curve: list[dict[str, float]], stage2: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in curve]
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot(epochs, [row["loss"] for row in curve], marker="o")
    left.set(title="listwise loss (train)", xlabel="epoch")
    right.plot(epochs, [row["val_recall_at_20"] for row in curve], marker="o", label="cross-attention")
    right.axhline(stage2, color="grey", linestyle="--", label="Stage 2 order")
    right.set(title="validation Recall@20", xlabel="epoch")
    right.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
