"""Stage 2 option C (issue 22): a cross-attention re-ranker of each list's top 50. Pure torch + numpy (no Kafka).

**Tokens of a (query, candidate) pair.** The query, the candidate, and each side's sampled neighbours: up to
``fanout[0]`` per side, so ``2 + 2 * fanout[0]`` tokens (22 by default). A side's neighbour sample takes the
pair's *common* neighbours first (bottom-k by hash among them), then the others (bottom-k by hash): the shared
nodes are the point of the model, and a uniform 10 of a 300-friend user would usually miss them. Each token is
``proj(node input) + tags``:

- node input (:func:`node_inputs`): the compact profile encoding (32), the GraphSAGE degree features (10), the
  node's GraphSAGE embedding if the model uses one (``embedding_dim``, zeros when missing) and a has-embedding flag;
- tags (learned embeddings): side (query / candidate), hop (0 root / 1 neighbour), is-common-neighbour, distance
  to the *other* endpoint (0, 1, 2, 3 = "3 or more / not seen"), plus a scalar: for a neighbour token, the share
  of its own sampled neighbours (hop 2, ``fanout[1]`` of them) that are neighbours of the other endpoint
  (paths of length 3 through it); for a root token, log1p(common-neighbour count).

Hop 2 enters through those tags, not as tokens of its own: 2 × (10 + 100) tokens per pair × 50 pairs is ~50x
the attention and input cost, far past the ≤ 3 ms per list this stage may add on one CPU thread.

**Model.** A pre-norm transformer encoder (every token attends to both subgraphs, padding masked), then
``[h_query, h_candidate, masked mean of all tokens]`` → MLP → one score. No positional encoding and a masked
mean: the score is invariant to the order of a side's neighbours. Sizes (:class:`CrossAttentionConfig`):
d=32, 2 layers, 4 heads (8 dims each), FFN 64 — 50 pairs × 22 tokens = 1,100 tokens per list. Measured on one
torch thread (shared 2-core box, 50 candidates): the forward takes ~3.2 ms at d=32, ~6.9 ms at d=64/FFN 128 and
~1.8 ms with one layer at d=32; d=64 was twice the ≤ 3 ms goal and also made training 3x slower.

**Sampling is deterministic per model version**: keys are splitmix64 of (salt, node, neighbour), the salt is
:func:`pymk.index.embedder.salt_for_version` of the model's version (or of the training seed while training),
so the same model sees the same tokens for the same graph in every process.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pymk import model_artifact
from pymk.events import Profile
from pymk.index.embedder import salt_for_version
from pymk.index.node_features import DEGREE_DIM, PROFILE_FEATURE_DIM, encode_degrees, encode_profile_compact
from pymk.index.sampling import bottom_k, mix64

TOP_N = 50  # Stage 2's top that option C re-ranks (it cannot precompute candidate vectors)
N_DISTANCES = 4  # distance tag 0, 1, 2, 3+ (3 also means "not seen within the samples")


@dataclass(frozen=True)
class CrossAttentionConfig:
    d_model: int = 32
    layers: int = 2
    heads: int = 4
    ffn_dim: int = 64
    dropout: float = 0.1
    fanout: tuple[int, ...] = field(default=(10, 10))  # hop-1 tokens per side, hop-2 sample per hop-1 token
    embedding_dim: int = 0  # GraphSAGE embedding width used as an input (0: none)
    top_n: int = TOP_N

    def __post_init__(self) -> None:
        object.__setattr__(self, "fanout", tuple(int(f) for f in self.fanout))
        if len(self.fanout) != 2 or min(self.fanout) < 0:
            raise ValueError("fanout: two non-negative sizes (hop 1, hop 2)")
        if self.d_model % self.heads or self.layers < 1 or self.top_n < 1:
            raise ValueError("d_model must divide into heads; at least one layer; top_n >= 1")

    @property
    def tokens(self) -> int:
        return 2 + 2 * self.fanout[0]

    @property
    def input_dim(self) -> int:
        return PROFILE_FEATURE_DIM + DEGREE_DIM + self.embedding_dim + 1


class GraphSource(Protocol):
    """What the token builder reads (MemorySource and the worker's ranking source both provide it)."""

    def neighbours(self, user: int) -> Collection[int]: ...

    def degree(self, user: int) -> int: ...

    def profile(self, user: int) -> Profile | None: ...

    def embedding(self, user: int) -> np.ndarray | None: ...


@dataclass(frozen=True)
class ListTokens:
    """The tokens of one query's candidate list (numpy, so training can store them as of a checkpoint)."""

    nodes: np.ndarray  # int64 [U] node ids whose inputs are rows of ``inputs``
    inputs: np.ndarray  # float32 [U, input_dim]
    node: np.ndarray  # int32 [P, T] row of ``inputs`` per token, -1 = padding
    side: np.ndarray  # int8 [P, T] 0 query side, 1 candidate side
    hop: np.ndarray  # int8 [P, T]
    common: np.ndarray  # int8 [P, T]
    distance: np.ndarray  # int8 [P, T] to the other endpoint, 0..3
    scalar: np.ndarray  # float32 [P, T]

    @property
    def pairs(self) -> int:
        return int(self.node.shape[0])


@lru_cache(maxsize=1 << 16)
def _profile_code(profile: Profile | None) -> np.ndarray:
    return encode_profile_compact(profile)


def node_inputs(nodes: np.ndarray, source: GraphSource, embedding_dim: int) -> np.ndarray:
    """float32 ``[len(nodes), input_dim]``: compact profile, degree features, embedding (+ has-embedding flag)."""
    ids = nodes.tolist()
    degrees = np.fromiter((source.degree(u) for u in ids), np.int64, len(ids))
    parts = [np.stack([_profile_code(source.profile(u)) for u in ids]) if ids
             else np.zeros((0, PROFILE_FEATURE_DIM), np.float32), encode_degrees(degrees)]
    if embedding_dim:
        vectors = np.zeros((len(ids), embedding_dim + 1), np.float32)
        for i, u in enumerate(ids):
            vector = source.embedding(u)
            if vector is not None and len(vector) == embedding_dim and np.all(np.isfinite(vector)):
                vectors[i, :embedding_dim] = vector
                vectors[i, embedding_dim] = 1.0
        parts.append(vectors)
    else:
        parts.append(np.zeros((len(ids), 1), np.float32))
    return np.concatenate(parts, axis=1).astype(np.float32)


def _edge_keys(owners: np.ndarray, others: np.ndarray) -> np.ndarray:
    """A uint64 key per (owner, neighbour) for set membership (a 64-bit hash; collisions ~2^-64 per pair)."""
    return mix64(owners.astype(np.int64).view(np.uint64)) ^ others.astype(np.int64).view(np.uint64)


def _as_array(values: Collection[int]) -> np.ndarray:
    return np.fromiter(values, np.int64, len(values))


def build_list_tokens(source: GraphSource, user: int, candidates: Sequence[int] | np.ndarray, salt: int,
                      config: CrossAttentionConfig) -> ListTokens:
    """The tokens of every (user, candidate) pair of one list, sampled with ``salt`` (see the module doc)."""
    cands = np.asarray(candidates, np.int64)
    n_pairs = len(cands)
    f1, f2 = config.fanout
    query_nb = _as_array(source.neighbours(user))
    cand_nb = [_as_array(source.neighbours(int(c))) for c in cands.tolist()]
    # Edges of both endpoints of every pair, for "is v a neighbour of the other endpoint?"
    known = np.concatenate([_edge_keys(np.full(len(query_nb), user), query_nb)]
                           + [_edge_keys(np.full(len(nb), c), nb) for c, nb in zip(cands.tolist(), cand_nb,
                                                                                    strict=True)])
    known.sort()

    def adjacent(owners: np.ndarray, others: np.ndarray) -> np.ndarray:
        if not len(known) or not len(others):
            return np.zeros(len(others), bool)
        keys = _edge_keys(owners, others)
        pos = np.minimum(np.searchsorted(known, keys), len(known) - 1)
        return known[pos] == keys

    # Segments 2p (query side of pair p, other endpoint = candidate p) and 2p+1 (candidate side, other = query).
    owners = np.empty(2 * n_pairs, np.int64)
    owners[0::2], owners[1::2] = user, cands
    others = np.empty(2 * n_pairs, np.int64)
    others[0::2], others[1::2] = cands, user
    lists = [nb for c_nb in cand_nb for nb in (query_nb, c_nb)]
    lengths = np.fromiter(map(len, lists), np.int64, len(lists))
    flat = np.concatenate(lists) if lists else np.zeros(0, np.int64)
    segment = np.repeat(np.arange(2 * n_pairs), lengths)
    common = adjacent(others[segment], flat)
    # Common neighbours first, then the rest, each by the version-salted hash (the sampler's bottom-k keys).
    keys = mix64(mix64(mix64(np.array([salt], np.int64).view(np.uint64)) ^ owners.view(np.uint64))[segment]
                 ^ flat.view(np.uint64))
    order = np.lexsort((keys, ~common, segment))
    segment, flat, common = segment[order], flat[order], common[order]
    starts = np.zeros(2 * n_pairs + 1, np.int64)
    np.cumsum(np.bincount(segment, minlength=2 * n_pairs), out=starts[1:])
    rank = np.arange(len(segment)) - starts[segment]
    chosen = rank < f1
    t_seg, t_node, t_common, t_rank = segment[chosen], flat[chosen], common[chosen], rank[chosen]
    common_count = np.bincount(segment[common], minlength=2 * n_pairs)[0::2]

    # Hop 2: each hop-1 token's own sample; the share of it adjacent to the other endpoint = paths of length 3.
    hop1 = np.unique(t_node)
    h_lists = [_as_array(source.neighbours(int(v))) for v in hop1.tolist()]
    h_len = np.fromiter(map(len, h_lists), np.int64, len(h_lists))
    h_flat = np.concatenate(h_lists) if h_lists else np.zeros(0, np.int64)
    sample2, count2 = bottom_k(hop1, h_len, h_flat, salt, f2)
    rows2 = sample2[np.searchsorted(hop1, t_node)] if len(t_node) else np.zeros((0, f2), np.int64)
    valid2 = rows2 >= 0
    t_other = others[t_seg]
    bridge = np.zeros(rows2.shape, bool)
    if valid2.any():
        bridge[valid2] = adjacent(np.broadcast_to(t_other[:, None], rows2.shape)[valid2], rows2[valid2])
    bridges = bridge.sum(axis=1)
    t_distance = np.where(t_node == t_other, 0, np.where(t_common, 1, np.where(bridges > 0, 2, 3)))
    t_scalar = bridges / max(f2, 1)
    del count2

    nodes = np.unique(np.concatenate([np.array([user], np.int64), cands, hop1]))
    width = config.tokens
    node = np.full((n_pairs, width), -1, np.int32)
    side = np.zeros((n_pairs, width), np.int8)
    hop = np.zeros((n_pairs, width), np.int8)
    is_common = np.zeros((n_pairs, width), np.int8)
    distance = np.full((n_pairs, width), 3, np.int8)
    scalar = np.zeros((n_pairs, width), np.float32)
    pair = np.arange(n_pairs)
    node[:, 0] = np.searchsorted(nodes, np.full(n_pairs, user))
    node[:, 1] = np.searchsorted(nodes, cands)
    side[:, 1] = 1
    root_distance = np.where(common_count > 0, 2, 3)
    distance[:, 0] = distance[:, 1] = root_distance
    scalar[:, 0] = scalar[:, 1] = np.log1p(common_count) / math.log1p(max(f1, 1))
    del pair
    p_of, s_of = t_seg // 2, t_seg % 2
    slot = 2 + s_of * f1 + t_rank
    node[p_of, slot] = np.searchsorted(nodes, t_node)
    side[p_of, slot] = s_of
    hop[p_of, slot] = 1
    is_common[p_of, slot] = t_common
    distance[p_of, slot] = t_distance
    scalar[p_of, slot] = t_scalar
    return ListTokens(nodes, node_inputs(nodes, source, config.embedding_dim), node, side, hop, is_common,
                      distance, scalar)


@dataclass(frozen=True)
class TokenBatch:
    """Tensors of one or more lists stacked: ``node`` indexes the stacked ``inputs``."""

    inputs: torch.Tensor  # float32 [U, input_dim]
    node: torch.Tensor  # int64 [P, T]
    side: torch.Tensor
    hop: torch.Tensor
    common: torch.Tensor
    distance: torch.Tensor
    scalar: torch.Tensor  # float32 [P, T]


def make_batch(lists: Sequence[ListTokens]) -> TokenBatch:
    offset = 0
    nodes = []
    for tokens in lists:
        nodes.append(np.where(tokens.node >= 0, tokens.node.astype(np.int64) + offset, -1))
        offset += len(tokens.nodes)

    def cat(name: str) -> torch.Tensor:
        return torch.from_numpy(np.concatenate([getattr(t, name) for t in lists]).astype(np.int64))

    return TokenBatch(torch.from_numpy(np.concatenate([t.inputs for t in lists]).astype(np.float32)),
                      torch.from_numpy(np.concatenate(nodes)), cat("side"), cat("hop"), cat("common"),
                      cat("distance"), torch.from_numpy(np.concatenate([t.scalar for t in lists])))


class CrossAttentionRanker(nn.Module):
    def __init__(self, config: CrossAttentionConfig) -> None:
        super().__init__()
        self.config = config
        self.version: str | None = None
        d = config.d_model
        self.input = nn.Linear(config.input_dim, d)
        self.side = nn.Embedding(2, d)
        self.hop = nn.Embedding(2, d)
        self.common = nn.Embedding(2, d)
        self.distance = nn.Embedding(N_DISTANCES, d)
        self.scalar = nn.Linear(1, d)
        self.norm = nn.LayerNorm(d)
        layer = nn.TransformerEncoderLayer(d, config.heads, config.ffn_dim, config.dropout, batch_first=True,
                                           norm_first=True)
        # enable_nested_tensor off: the padded and nested paths round differently, and scores must not depend on
        # which one a batch happened to take.
        self.encoder = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.LayerNorm(3 * d), nn.Linear(3 * d, d), nn.ReLU(), nn.Linear(d, 1))

    def forward(self, batch: TokenBatch) -> torch.Tensor:
        """Scores ``[P]`` of the batch's pairs."""
        mask = batch.node >= 0
        projected = self.input(batch.inputs)
        x = projected[batch.node.clamp(min=0)]
        x = x + self.side(batch.side) + self.hop(batch.hop) + self.common(batch.common)
        x = x + self.distance(batch.distance) + self.scalar(batch.scalar.unsqueeze(-1))
        x = self.norm(x) * mask.unsqueeze(-1)
        h = self.encoder(x, src_key_padding_mask=~mask)
        weights = mask.unsqueeze(-1).to(h.dtype)
        mean = (h * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self.head(torch.cat([h[:, 0], h[:, 1], mean], dim=1)).squeeze(-1)

    def sampling_salt(self) -> int:
        """The sampler's salt: a hash of the model version (so the same version samples the same tokens)."""
        return salt_for_version(self.version or "cross-attention-untrained")

    @torch.no_grad()
    def score_list(self, source: GraphSource, user: int, candidates: Sequence[int] | np.ndarray) -> np.ndarray:
        """Scores of ``candidates`` for ``user`` in one batched forward pass (float64 [n])."""
        if len(candidates) == 0:
            return np.empty(0)
        tokens = build_list_tokens(source, user, candidates, self.sampling_salt(), self.config)
        was_training = self.training
        self.eval()
        try:
            return self(make_batch([tokens])).double().numpy()
        finally:
            self.train(was_training)


def listwise_loss(scores: torch.Tensor, labels: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Mean over lists of the softmax cross-entropy of each list's positives (ListNet with a uniform target
    over the positives): the other candidates of the list are its negatives."""
    losses = []
    start = 0
    for size in sizes:
        s, y = scores[start:start + size], labels[start:start + size]
        start += size
        target = y / y.sum().clamp(min=1.0)
        losses.append(-(target * F.log_softmax(s, dim=0)).sum())
    return torch.stack(losses).mean()


# ---- versions, saving, loading (the layout and its checks: pymk/model_artifact.py) -------------------------------
def make_version(model: CrossAttentionRanker, when: datetime | None = None) -> str:
    return model_artifact.make_version("xattn", model, when)


def save_model(model: CrossAttentionRanker, directory: Path | str, metadata: dict[str, Any] | None = None
               ) -> dict[str, Any]:
    config = asdict(model.config)
    return model_artifact.save_torch_model(model, directory, metadata, "xattn", config,
                                           {"config": config, "kind": "cross-attention"})


def load_cross_attention(directory: Path | str) -> tuple[CrossAttentionRanker, dict[str, Any]]:
    model, meta, _ = model_artifact.load_torch_model(
        directory, lambda config: CrossAttentionRanker(CrossAttentionConfig(**config)))
    return model, meta


def rerank_top(order: np.ndarray, rerank_scores: np.ndarray, top_n: int) -> np.ndarray:
    """``order`` (Stage 2's full order of candidate indices) with its first ``top_n`` re-ordered by
    ``rerank_scores`` (one per re-ranked index, in ``order``'s order; ties keep Stage 2's order)."""
    head = order[:top_n]
    by = np.argsort(-np.asarray(rerank_scores, np.float64), kind="stable")
    return np.concatenate([head[by], order[top_n:]])


# ---- serving ------------------------------------------------------------------------------------------------------
SERVING_THREADS = 1  # one list's forward is ~1,100 tokens: more threads mostly add sync cost, and workers share cores


def rerank_scored(user: int, scored: Any, source: GraphSource, model: CrossAttentionRanker, k: int
                  ) -> tuple[Any, dict[int, float]]:
    """Re-rank Stage 2's top ``model.config.top_n`` of a :class:`pymk.ranking.recommend.ScoredCandidates` in one
    batched forward pass; returns it with ``top`` (the first ``k``) replaced, and {candidate index: re-ranker
    score} of the re-ranked head. Stage 2's scores stay (the reasons and the unshown sample use them)."""
    import dataclasses
    import time

    from pymk.ranking.features import FEATURE_INDEX
    from pymk.ranking.recommend import ranking_order

    ids = scored.candidates.ids
    if not len(ids):
        return scored, {}
    started = time.perf_counter()
    head = ranking_order(scored.scores, scored.features[:, FEATURE_INDEX["candidate_degree_log"]], ids,
                         model.config.top_n)
    previous = torch.get_num_threads()
    torch.set_num_threads(SERVING_THREADS)
    try:
        scores = model.score_list(source, user, ids[head])
    finally:
        torch.set_num_threads(previous)
    order = rerank_top(head, scores, len(head))
    timings = dict(scored.timings)
    timings["rerank"] = (time.perf_counter() - started) * 1e3
    by_index = {int(i): float(s) for i, s in zip(head.tolist(), scores.tolist(), strict=True)}
    return dataclasses.replace(scored, top=order[:k], timings=timings), by_index


def mark_reranked(ranked: Any, rerank_scores: dict[int, float], candidate_index: dict[int, int], version: str
                  ) -> Any:
    """The items of a :class:`pymk.ranking.recommend.RankedList` with ``reasons["placed_by"]`` (the re-ranker's
    version, or "stage2" for an item below the re-ranked head) and ``reasons["rerank_score"]``; the reasons built
    from the features and the mutual connections stay as they are."""
    import dataclasses

    items = []
    for item in ranked.items:
        index = candidate_index.get(item.candidate.user)
        reasons = dict(item.reasons)
        if index is not None and index in rerank_scores:
            reasons.update(placed_by=version, rerank_score=round(rerank_scores[index], 6))
        else:
            reasons["placed_by"] = "stage2"
        items.append(dataclasses.replace(item, reasons=reasons))
    return dataclasses.replace(ranked, items=tuple(items))
