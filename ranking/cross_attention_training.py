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

**Random splits: the holdout replay** (``replay="holdout"``, the default for untimed edge lists), as the XGBoost
ranker's (:func:`pymk.ranking.training_data.holdout_pairs` / ``holdout_folds``, the same fraction, folds and seed):
each fold of the hidden pairs is hidden on its own, the lists are built on the rest of the past graph, the fold's
pairs are the positives. Guard: no hidden pair is an edge of the source the tokens come from (checked per fold),
and GraphSAGE, trained on the visible 80 %, never saw one.

**Validation**: the lists of the last checkpoint (temporal) or of a random share of each fold's query users
(holdout); the number is Recall@20 over the full future partner set (the replay's definition), top 20 of the
re-ranked top 50, next to Stage 2's own top 20 on the same lists. Early stopping on it (best epoch kept). The
metadata keeps the best epoch's gain over Stage 2 and its paired standard error over the lists: the best of several
epochs on the same lists is an optimistic pick, so a gain counts only when it is clear of that noise.

Stage 2's top 50 comes from the product's XGBoost ranker, which was trained on the same replay: on training
queries its top 50 holds more positives than on unseen ones (the lists are easier than the future's); the
validation lists share that bias, so the gain that matters is the evaluation's, on the split's future.
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
from pymk.ranking.memory_source import MemorySource
from pymk.ranking.recommend import score_candidates
from pymk.ranking.source import Scorer
from pymk.ranking.training_data import (
    DAY_MS,
    EmbeddingsAt,
    TrainingDataConfig,
    check_no_leakage,
    history_events,
    holdout_fold,
    holdout_folds,
    holdout_pairs,
    new_connections,
    replay_checkpoints,
)
from pymk.reproducible import config_digest, deterministic


@dataclass(frozen=True)
class RerankerTrainingConfig:
    model: CrossAttentionConfig = field(default_factory=CrossAttentionConfig)
    horizon_days: float = 14.0
    checkpoint_fractions: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)  # the XGBoost replay's checkpoints
    queries_per_checkpoint: int = 400  # the XGBoost replay's (200 gave 535 lists on CollegeMsg: overfit at epoch 1)
    # "temporal" (timed data), "holdout" (a random split's task: which edges are missing?) or "auto" (by the data).
    # The holdout's hidden pairs and folds are the XGBoost ranker's (same fraction, folds and seed), so GraphSAGE,
    # trained on the visible rest, never saw a label of either.
    replay: str = "auto"
    holdout_fraction: float = 0.2
    holdout_folds: int = 4
    holdout_seed: int = 0
    holdout_queries: int = 2000  # query users over all folds (the XGBoost holdout's)
    holdout_val_share: float = 0.2  # share of them whose lists validate
    candidate_config: CandidateConfig = field(default_factory=CandidateConfig)
    epochs: int = 8
    patience: int = 3
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    lists_per_step: int = 16
    seed: int = 0
    # Fixed: BLAS splits float sums by thread count, so another count gives other weights. One: on a shared
    # machine (load 10+ on 2 cores) two threads made a step of this small model take ~3 s, waiting for each other.
    threads: int = 1
    progress: bool = False

    def __post_init__(self) -> None:
        if self.replay not in ("auto", "temporal", "holdout"):
            raise ValueError(f"replay must be 'auto', 'temporal' or 'holdout', not {self.replay!r}")

    def replay_for(self, timed: bool) -> str:
        return self.replay if self.replay != "auto" else "temporal" if timed else "holdout"


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
    """Lists of the temporal replay (the last checkpoint validates) or of the holdout replay (a share of the query
    users validates), as :attr:`RerankerTrainingConfig.replay` says (see the module doc)."""
    scorer = scorer or HeuristicScorer()
    timed = events.timed if isinstance(events, EdgeHistory) else True
    if isinstance(events, EdgeHistory):
        events = history_events(events)
    connections = new_connections(events)
    if len(connections) < 2:
        raise ValueError("need at least two connections to replay")
    if config.replay_for(timed) == "holdout":
        return _holdout_lists(events, connections, config, salt, scorer, embeddings_at)
    if not timed:
        raise ValueError("an untimed edge list has no temporal replay: use replay='holdout'")
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
            made = _replay_list(source, user, future[user], t, is_val, config, salt, scorer)
            bar.update(1)
            if made is not None:
                (val if is_val else train).append(made)
                kept += 1
        per_checkpoint.append({"t": t, "queries": len(queries), "active": len(active), "lists": kept})
    bar.close()
    return RerankData(train, val, _stats(train, val, per_checkpoint, scorer, "temporal", started))


def _replay_list(source: MemorySource, user: int, partners: set[int], as_of: int, is_val: bool,
                 config: RerankerTrainingConfig, salt: int, scorer: Scorer) -> RerankList | None:
    """One query's list at ``as_of``: Stage 2's top n of the past-only ``source``, labelled by ``partners``; None
    when it teaches nothing (a training list without a positive in the top n; no known partner)."""
    check_no_leakage(source, as_of)  # the guard: every token below comes from this past-only source
    scored = score_candidates(user, source, scorer, config.candidate_config, as_of, config.model.top_n)
    ids = scored.candidates.ids[scored.top]
    labels = np.isin(ids, np.fromiter(partners, np.int64, len(partners))).astype(np.float32)
    known = sum(1 for p in partners if source.degree(p) > 0)
    if not len(ids) or not known or (not is_val and not labels.any()):
        return None
    tokens = build_list_tokens(source, user, ids, salt, config.model)
    return RerankList(user, as_of, ids, labels, known, tokens)


def _holdout_lists(events: Sequence[InputEvent], connections: list[tuple[int, int, int]],
                   config: RerankerTrainingConfig, salt: int, scorer: Scorer,
                   embeddings_at: EmbeddingsAt | None) -> RerankData:
    """The holdout replay of a random split, fold by fold as the XGBoost ranker's (same hidden pairs and folds):
    the graph without the fold's pairs, labels = the fold's pairs; a random ``holdout_val_share`` of each fold's
    query users validates. Guard: the source holds no hidden pair (checked before any list of the fold)."""
    data_config = TrainingDataConfig(replay="holdout", holdout_fraction=config.holdout_fraction,
                                     holdout_folds=config.holdout_folds, seed=config.holdout_seed)
    hidden = holdout_pairs(connections, config.holdout_fraction, config.holdout_seed)
    folds = holdout_folds(hidden, data_config)
    rng = np.random.default_rng(config.seed)
    train: list[RerankList] = []
    val: list[RerankList] = []
    per_fold = []
    started = time.perf_counter()
    per_fold_queries = math.ceil(config.holdout_queries / len(folds))
    bar = _bar(per_fold_queries * len(folds), config.progress, "holdout replay", "query")
    for fold in folds:
        source, as_of, future = holdout_fold(events, fold, embeddings_at)  # the ranker's, with its guards
        queries = rng.permutation(sorted(future))[:per_fold_queries].tolist()
        fold_val = set(rng.permutation(queries)[: round(config.holdout_val_share * len(queries))].tolist())
        kept = 0
        for user in queries:
            made = _replay_list(source, user, future[user], as_of, user in fold_val, config, salt, scorer)
            bar.update(1)
            if made is not None:
                (val if user in fold_val else train).append(made)
                kept += 1
        per_fold.append({"t": as_of, "queries": len(queries), "active": len(future), "lists": kept,
                         "hidden_pairs": len(fold)})
    bar.close()
    return RerankData(train, val, _stats(train, val, per_fold, scorer, "holdout", started))


def _stats(train: list[RerankList], val: list[RerankList], per_step: list[dict[str, Any]], scorer: Scorer,
           replay: str, started: float) -> dict[str, Any]:
    return {"replay": replay, "checkpoints": per_step, "train_lists": len(train), "val_lists": len(val),
            "train_positives": int(sum(r.labels.sum() for r in train)), "scorer": scorer.version,
            "seconds": round(time.perf_counter() - started, 2)}


def recall_values(lists: Sequence[RerankList], scores: Sequence[np.ndarray] | None, k: int = 20) -> np.ndarray:
    """Recall@k of each list re-ranked by ``scores`` (None: Stage 2's order)."""
    values = []
    for i, item in enumerate(lists):
        order = np.arange(len(item.ids)) if scores is None else np.argsort(-scores[i], kind="stable")
        values.append(float(item.labels[order[:k]].sum()) / item.partners)
    return np.asarray(values, np.float64)


def recall_at(lists: Sequence[RerankList], scores: Sequence[np.ndarray] | None, k: int = 20) -> float:
    """Mean Recall@k of the lists re-ranked by ``scores`` (None: Stage 2's order)."""
    values = recall_values(lists, scores, k)
    return float(values.mean()) if len(values) else math.nan


def paired_gain(after: np.ndarray, before: np.ndarray) -> tuple[float, float]:
    """(mean gain, its standard error) of per-list values on the same lists: the gain is judged against the
    list-to-list spread of the differences, not against zero (NaN error with fewer than two lists)."""
    differences = np.asarray(after, np.float64) - np.asarray(before, np.float64)
    if len(differences) < 2:
        return (float(differences.mean()) if len(differences) else math.nan), math.nan
    return float(differences.mean()), float(differences.std(ddof=1) / math.sqrt(len(differences)))


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


def data_end(events: Sequence[InputEvent] | EdgeHistory) -> int:
    all_events = history_events(events) if isinstance(events, EdgeHistory) else events
    return max((e.ts for e in all_events), default=0)


def train_reranker(events: Sequence[InputEvent] | EdgeHistory, out_dir: Path | str,
                   config: RerankerTrainingConfig | None = None, scorer: Scorer | None = None,
                   embeddings_at: EmbeddingsAt | None = None, data: RerankData | None = None) -> RerankerResult:
    """Replay, train with early stopping on validation Recall@20, save model + metadata + curve PNG. ``data``:
    lists already built (by :func:`build_rerank_data` with :func:`data_salt` of the same config and events), e.g.
    to compare model sizes on the same lists."""
    config = config or RerankerTrainingConfig()
    out_dir = Path(out_dir)
    version = training_version(config, data_end(events))
    if data is None:
        data = build_rerank_data(events, config, salt_for_version(version), scorer, embeddings_at)
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
    stage2_values = recall_values(data.val, None)
    stage2 = float(stage2_values.mean())
    # the best epoch's gain and its paired standard error over the validation lists (the pick's rule: see
    # cross_attention_eval.reranker_validation)
    gain, gain_error = paired_gain(recall_values(data.val, score_lists(model, data.val)), stage2_values)
    png = out_dir / "curve.png"
    metadata = {"version": version, "best_epoch": best[1], "epochs_run": len(curve), "curve": curve,
                "val_recall_at_20": best[0], "stage2_val_recall_at_20": stage2,
                "val_gain_at_20": gain, "val_gain_standard_error": gain_error,
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
