"""The product's rows of ``pymk evaluate``, offline: the same ranking code the workers run (Stage 1 hybrid
candidates, the 17 features, the ranker), over a :class:`MemorySource` holding the past graph only.

No leakage: models see only the past of the split.
- GraphSAGE is trained on the connections before the ranker's first training checkpoint (the first half of the
  past), so the embeddings the ranker learns from never encode the labels it is trained on; at serving time the
  same (inductive) model embeds every user on the whole past graph.
- The ranker's labels come from inside the past: a temporal replay of the past with checkpoints at 50–90 % of
  it, labels = connections within the horizon after each checkpoint, still in the past.
- Random splits: the ranker's task mirrors the split's (which edges are missing?): a holdout replay hides a
  seeded 20 % of the past connections and labels them; GraphSAGE is then trained on the visible past only
  (:func:`embedding_training_connections`), so it never saw a hidden (label) edge either.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from pymk.datasets import EdgeHistory
from pymk.index.ann import AnnConfig, AnnIndex
from pymk.index.embedder import Embedder, salt_for_version
from pymk.index.sage import GraphSage, load_model
from pymk.index.training import EmbeddingTrainingConfig
from pymk.ranking.candidates import CandidateConfig
from pymk.ranking.evaluation import EvaluationSplit
from pymk.ranking.features import FEATURE_INDEX, FeatureBuilder
from pymk.ranking.memory_source import MemorySource
from pymk.ranking.model import Ranker, RankerConfig
from pymk.ranking.recommend import ranking_order, score_candidates
from pymk.ranking.source import Scorer
from pymk.ranking.training_data import TrainingDataConfig, holdout_pairs

FIRST_CHECKPOINT = 0.5


@dataclass(frozen=True)
class ProductModels:
    sage_dir: Path
    ranker_dir: Path
    sage_version: str
    ranker_version: str


def past_history(split: EvaluationSplit, history: EdgeHistory) -> EdgeHistory:
    """The split's past as an edge history (later interactions of past pairs before the future starts)."""
    past = list(split.past_connections)
    end = max((ts for _, _, ts in split.future_connections), default=None)
    start = min((ts for _, _, ts in split.future_connections), default=None)
    repeats = [] if split.kind == "random" or start is None or end is None else [
        r for r in history.repeats if r[2] < start]
    return EdgeHistory(f"{history.path} (past)", history.timed, past, repeats, 0, len(past))


def ranker_training_config(split: EvaluationSplit, hub_degree: int = 0) -> TrainingDataConfig:
    """The ranker's training task mirrors the split's: a temporal replay for a time split (who connects
    next?), a holdout replay for a random split (which edges are missing?). ``hub_degree``: the worker's
    PYMK_HUB_DEGREE, so the rows are computed under the cap the product will serve with."""
    return TrainingDataConfig(replay="temporal" if split.kind == "time" else "holdout", hub_degree=hub_degree)


def embedding_training_connections(past: EdgeHistory, config: TrainingDataConfig) -> list[tuple[int, int, int]]:
    """What GraphSAGE may be trained on so that it never saw a label of the ranker's training data: the
    connections before the first checkpoint (temporal), or the visible ones (holdout)."""
    if config.replay_for(past.timed) == "holdout":
        hidden = holdout_pairs(past.connections, config.holdout_fraction, config.seed)
        return [c for c in past.connections if (min(c[0], c[1]), max(c[0], c[1])) not in hidden]
    return past.connections[: int(FIRST_CHECKPOINT * len(past.connections))]


# Torch threads while the evaluation trains GraphSAGE: fixed, because BLAS splits its float reductions by thread
# count, so another count gives other weights. Two: what our machines have (more would not be faster here).
TRAINING_THREADS = 2


@dataclass(frozen=True)
class ProductTrainingConfigs:
    """Every setting the evaluation's models are trained with (a digest of them keys the model cache)."""

    embeddings: EmbeddingTrainingConfig
    ranker_data: TrainingDataConfig
    ranker: RankerConfig


def product_training_configs(split: EvaluationSplit, epochs: int = 20, progress: bool = False,
                             hub_degree: int = 0) -> ProductTrainingConfigs:
    return ProductTrainingConfigs(EmbeddingTrainingConfig(epochs=epochs, progress=progress, threads=TRAINING_THREADS),
                                  ranker_training_config(split, hub_degree), RankerConfig())


def train_product_models(split: EvaluationSplit, history: EdgeHistory, out_dir: Path, progress: bool = False,
                         epochs: int = 20, configs: ProductTrainingConfigs | None = None,
                         sage: tuple[Path, str] | None = None) -> ProductModels:
    """GraphSAGE, then the ranker, on the split's past; the same inputs and configs give the same models (every
    step is seeded and deterministic, see :mod:`pymk.reproducible`). ``sage``: (directory, version) of a
    GraphSAGE model already trained on the same past and configs, so that only the ranker is trained."""
    from pymk.index.training import train_embeddings
    from pymk.ranking.training_data import embeddings_at_checkpoint, train_ranker

    configs = configs or product_training_configs(split, epochs, progress)
    past = past_history(split, history)
    if sage is None:
        early = embedding_training_connections(past, configs.ranker_data)
        # The version is stamped with the training data's end, not the wall clock: the embeddings' sampling salt
        # is derived from the version, so a clock stamp alone made every retrained model embed differently.
        data_end = datetime.fromtimestamp(max((ts for _, _, ts in early), default=0) / 1000, UTC)
        trained = train_embeddings(early, None, out_dir / "embeddings", configs.embeddings, version_time=data_end)
        sage = (trained.model_dir, str(trained.metadata["version"]))
    ranker = train_ranker(past, out_dir / "ranker", configs.ranker_data, configs.ranker, progress=progress,
                          report=None, embeddings_at=embeddings_at_checkpoint(sage[0]))
    return ProductModels(sage[0], out_dir / "ranker", sage[1], ranker.version)


def past_source(split: EvaluationSplit, model: GraphSage, version: str, ann: AnnConfig,
                hub_degree: int = 0) -> MemorySource:
    """The past graph as the workers would hold it after replaying it: every user embedded and indexed
    (``hub_degree``: the workers' PYMK_HUB_DEGREE; GraphSAGE's neighbour sampling is not capped, as in the worker)."""
    index = AnnIndex(ann)
    source = MemorySource(ann=lambda user, k, exclude: _search(index, source, user, k, exclude),
                          hub_degree=hub_degree)
    for u, v, ts in split.past_connections:
        source.add_connection(u, v, ts)
    users = sorted(source.users())
    vectors = Embedder(model, source, source).embed(users, salt_for_version(version))
    source.set_embeddings(dict(zip(users, vectors, strict=True)))
    index.upsert(np.asarray(users, dtype=np.int64), vectors)
    return source


def _search(index: AnnIndex, source: MemorySource, user: int, k: int,
            exclude: Collection[int]) -> Sequence[tuple[int, float]]:
    vector = source.embedding(user)
    return [] if vector is None else index.search(vector, k, exclude=set(exclude) | {user})


class OrderedCandidatesMethod:
    """A :class:`pymk.ranking.evaluation.Method` over a full ordering of each user's candidates, in the product's
    final order (score, then degree, then id); a subclass says how a user's candidates are scored
    (:meth:`scored`). Users beyond the candidates are not ranked. The orderings of the last 4,096 users asked
    about are kept (the protocol asks about a user several times)."""

    CACHED_USERS = 4096

    def __init__(self) -> None:
        self._cache: dict[int, tuple[list[int], set[int]]] = {}

    def scored(self, user: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(candidate ids, their scores, the degree key of the tie rule) of ``user``."""
        raise NotImplementedError

    def _ordered(self, user: int) -> tuple[list[int], set[int]]:
        held = self._cache.get(user)
        if held is None:
            ids, scores, degree_key = self.scored(user)
            order = ranking_order(scores, degree_key, ids, len(ids))
            ranked = [int(x) for x in ids[order]]
            held = self._cache[user] = (ranked, set(ranked))
            if len(self._cache) > self.CACHED_USERS:
                self._cache.pop(next(iter(self._cache)))
        return held

    def rank(self, user: int, k: int) -> list[int]:
        return self._ordered(user)[0][:k]

    def candidates(self, user: int) -> Collection[int]:
        return self._ordered(user)[1]

    def best_rank(self, user: int, targets: Collection[int]) -> int | None:
        for position, candidate in enumerate(self._ordered(user)[0], start=1):
            if candidate in targets:
                return position
        return None


class ProductMethod(OrderedCandidatesMethod):
    """The full ordering of a user's Stage 1 candidates by the scorer (the top 20 of it is the published list)."""

    def __init__(self, name: str, source: MemorySource, scorer: Scorer, config: CandidateConfig,
                 as_of_ms: int | Callable[[int], int]) -> None:
        super().__init__()
        self.name = name
        self.source = source
        self.scorer = scorer
        self.config = config
        self.as_of_ms = as_of_ms
        self.builder = FeatureBuilder()
        # the cascade's fidelity on these lists (ranking/cascade.py): lists it shortened, and of them those whose
        # top 20 equal the full model's
        self.cascade_lists = self.cascade_top20_equal = 0

    def scored(self, user: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        as_of = self.as_of_ms(user) if callable(self.as_of_ms) else self.as_of_ms
        scored = score_candidates(user, self.source, self.scorer, self.config, as_of, k=20, builder=self.builder)
        degree = scored.features[:, FEATURE_INDEX["candidate_degree_log"]]
        if scored.prefilter_margins is not None:
            exact = np.asarray(self.scorer.predict(scored.features), np.float64)
            self.cascade_lists += 1
            self.cascade_top20_equal += bool(np.array_equal(
                scored.top, ranking_order(exact, degree, scored.candidates.ids, 20)))
        return scored.candidates.ids, scored.scores, degree

    def cascade_fidelity(self) -> dict[str, Any]:
        """How many lists the cascade scored and the share whose top 20 equal the full model's."""
        return {"lists_through_cascade": self.cascade_lists,
                "top20_equal_share": self.cascade_top20_equal / self.cascade_lists if self.cascade_lists else None}


class AnnOnlyMethod:
    """GraphSAGE embeddings alone: the nearest users by cosine, excluding the user and its past neighbours."""

    name = "GraphSAGE-ANN"

    def __init__(self, source: MemorySource, depth: int = 1000) -> None:
        self.source = source
        self.depth = depth

    def _found(self, user: int, k: int) -> list[int]:
        exclude = set(self.source.neighbours(user)) | {user}
        return [v for v, _ in self.source.ann_neighbours(user, k, exclude)]

    def rank(self, user: int, k: int) -> list[int]:
        return self._found(user, k)

    def candidates(self, user: int) -> Collection[int]:
        return set(self._found(user, self.depth))


def product_methods(split: EvaluationSplit, models: ProductModels, ann: AnnConfig,
                    candidate_config: CandidateConfig | None = None, hub_degree: int = 0) -> list[object]:
    config = candidate_config or CandidateConfig()
    model, _ = load_model(models.sage_dir)
    source = past_source(split, model, models.sage_version, ann, hub_degree)
    ranker = Ranker.load(models.ranker_dir)
    as_of = max(ts for _, _, ts in split.past_connections)  # the event time of the end of the past
    graph_only = CandidateConfig(graph_k=config.graph_k, ann_k=0, popular_k=0, max_candidates=config.max_candidates)
    return [
        AnnOnlyMethod(source, depth=config.ann_k),
        ProductMethod("2-hop+XGBoost", source, ranker, graph_only, as_of),
        ProductMethod("hybrid+XGBoost", source, ranker, config, as_of),
    ]


def candidate_sets(methods: Sequence[object]) -> dict[str, Callable[[int], Collection[int]]]:
    """Coverage of the candidate sets: ANN-only and hybrid (the graph-only set is the evaluator's own)."""
    by_name = {getattr(m, "name"): m for m in methods}  # noqa: B009 - methods of several classes
    return {"ann": by_name["GraphSAGE-ANN"].candidates,  # type: ignore[attr-defined]
            "hybrid": by_name["hybrid+XGBoost"].candidates}  # type: ignore[attr-defined]
