"""Stage 2 option C (issue 22): a cross-attention re-ranker of each list's top 50. Pure torch + numpy (no Kafka).

**Tokens of a (query, candidate) pair.** The query, the candidate, and each side's sampled neighbours: up to
``fanout[0]`` per side, so ``2 + 2 * fanout[0]`` tokens (22 by default). A side's neighbour sample takes the
pair's *common* neighbours first (bottom-k by hash among them), then the others (bottom-k by hash): the shared
nodes are the point of the model, and a uniform 10 of a 300-friend user would usually miss them. Each token is
``proj(node input) + tags``:

- node input (:func:`node_inputs`): the compact profile encoding (32), the GraphSAGE degree features (10), the
  node's GraphSAGE embedding if the model uses one (``embedding_dim``, zeros when missing) and a has-embedding flag;
- tags (one learned table indexed by their combination): side (query / candidate), hop (0 root / 1 neighbour),
  is-common-neighbour, distance to the *other* endpoint (0, 1, 2, 3 = "3 or more / not seen"), plus a scalar.
  A query-side neighbour z (other endpoint: the candidate): the share of z's own sample (hop 2, ``fanout[1]`` of
  its neighbours) adjacent to the candidate, i.e. paths query–z–w–candidate. A candidate-side neighbour v: the
  exact share of v's neighbours adjacent to the query, |N(v) ∩ N(query)| / deg(v), read from the query's 2-hop
  counts that Stage 1 has just computed (no hop-2 rows of the candidates are read). A root: log1p(common count).

Hop 2 enters through those tags, not as tokens of its own: 2 × (10 + 100) tokens per pair × 50 pairs is ~50x
the attention and input cost, far past the ≤ 3 ms per list this stage may add on one CPU thread.

**What a worker holds.** A worker holds its partition's users and the mirrors of their neighbours, not the whole
graph (``neighbours`` of another partition's user is an error there). The builder reads
``visible_neighbours`` when the source has it: the query's row and its neighbours' mirrors are always held; a
candidate whose row is not held (no neighbour in the partition) shows its common neighbours with the query, which
the query's mirrors give. Offline (:class:`MemorySource`) every row is held, so offline lists see a candidate's
whole neighbourhood where the worker may see only the shared part: a known train/serve difference for candidates
with no neighbour in the query's partition.

**Model.** A pre-norm transformer encoder (:class:`EncoderBlock`: every token attends to both subgraphs, padding
masked), then ``[h_query, h_candidate, masked mean of all tokens]`` → MLP → one score. No positional encoding and
a masked mean: the score is invariant to the order of a side's neighbours. Sizes (:class:`CrossAttentionConfig`):
d=16, 1 layer, 2 heads, FFN 32 by default — 50 pairs × 22 tokens = 1,100 tokens per list. Cost per list of 50
on one torch thread (docs/benchmarks.md, "cross-attention re-ranker"): the forward ~1.3 ms at d=16/1 layer against
~3.2 ms at d=32/2 layers. On the same CollegeMsg replay lists both validate at Recall@20 0.1419 (Stage 2's order
0.1146); the small one trains 4x faster (82 s against 325 s), so it is the default.

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
from pymk.features.graph import TwoHopArrays
from pymk.index.embedder import salt_for_version
from pymk.index.node_features import DEGREE_DIM, PROFILE_FEATURE_DIM, encode_degrees, encode_profile_compact
from pymk.index.sampling import bottom_k, mix64

TOP_N = 50  # Stage 2's top that option C re-ranks (it cannot precompute candidate vectors)
N_DISTANCES = 4  # distance tag 0, 1, 2, 3+ (3 also means "not seen within the samples")


@dataclass(frozen=True)
class CrossAttentionConfig:
    # Module doc: d=32 with 2 layers costs ~2.4x the forward and validated no better on the same lists
    d_model: int = 16
    layers: int = 1
    heads: int = 2
    ffn_dim: int = 32
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
    """What the token builder reads (MemorySource and the worker's ranking source both provide it). Read when
    present: ``visible_neighbours(node)``, a node's neighbours as the reader holds them, empty when it does not
    hold the node's row (a worker holds its partition's users and the mirrors of their neighbours, not the whole
    graph: ``neighbours`` of another partition's user is an error there); ``degrees_of``, ``embeddings_of`` and
    ``many_profiles`` (one gather for all of a list's nodes instead of a call each)."""

    def neighbours(self, user: int) -> Collection[int]: ...

    def common_neighbors(self, user: int, candidate: int) -> Sequence[int]: ...

    def two_hop_arrays(self, user: int) -> TwoHopArrays: ...

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
def _encoded_profile(profile: Profile | None) -> np.ndarray:
    """By content: a source that builds a new Profile object per read still encodes each distinct one once."""
    return encode_profile_compact(profile)


class ProfileCodes:
    """Compact profile codes (:func:`encode_profile_compact`), one row of a matrix per node, reused while the
    source hands out the *same* Profile object for the node (Profile is frozen; sources return the objects they
    hold, so identity means unchanged). The entry keeps its Profile alive, so an id() is never reused while
    cached. Hashing each Profile's fields for an lru_cache lookup was ~70 % of :func:`node_inputs`."""

    def __init__(self, capacity: int = 1 << 16) -> None:
        self.capacity = capacity
        self.rows: dict[int, tuple[Profile | None, int]] = {}
        self.codes = np.zeros((1024, PROFILE_FEATURE_DIM), np.float32)

    def gather(self, ids: list[int], profiles: Sequence[Profile | None]) -> np.ndarray:
        """float32 ``[len(ids), PROFILE_FEATURE_DIM]``: the codes of ``profiles`` (one per id)."""
        rows = self.rows
        if len(rows) + len(ids) > self.capacity:  # full: start over (never mid-call, so rows below stay valid)
            rows.clear()
        at = np.empty(len(ids), np.int64)
        for i, (node, profile) in enumerate(zip(ids, profiles, strict=True)):
            held = rows.get(node)
            if held is None or held[0] is not profile:
                row = len(rows) if held is None else held[1]
                if row >= len(self.codes):
                    self.codes = np.concatenate([self.codes, np.zeros_like(self.codes)])
                self.codes[row] = _encoded_profile(profile)
                held = rows[node] = (profile, row)
            at[i] = held[1]
        return self.codes[at]


_PROFILE_CODES = ProfileCodes()


def node_inputs(nodes: np.ndarray, source: GraphSource, embedding_dim: int,
                degrees: np.ndarray | None = None) -> np.ndarray:
    """float32 ``[len(nodes), input_dim]``: compact profile, degree features, embedding (+ has-embedding flag)."""
    ids = nodes.tolist()
    if degrees is None:
        degrees = node_degrees(nodes, source)
    many_profiles = getattr(source, "many_profiles", None)
    profiles = many_profiles(ids) if many_profiles is not None else [source.profile(u) for u in ids]
    start = PROFILE_FEATURE_DIM + DEGREE_DIM  # the embedding's first column
    out = np.zeros((len(ids), start + embedding_dim + 1), np.float32)  # one array filled in place, no concatenate
    if not ids:
        return out
    out[:, :PROFILE_FEATURE_DIM] = _PROFILE_CODES.gather(ids, profiles)
    out[:, PROFILE_FEATURE_DIM:start] = encode_degrees(degrees)
    if embedding_dim:
        embeddings_of = getattr(source, "embeddings_of", None)
        if embeddings_of is not None:
            held = np.asarray(embeddings_of(nodes), np.float32)
            if held.ndim == 2 and held.shape[1] == embedding_dim:
                usable = np.isfinite(held).all(axis=1)
                if usable.all():  # the usual case: plain slices, no masked copies
                    out[:, start:start + embedding_dim] = held
                    out[:, start + embedding_dim] = 1.0
                else:
                    out[usable, start:start + embedding_dim] = held[usable]
                    out[usable, start + embedding_dim] = 1.0
        else:
            for i, u in enumerate(ids):
                vector = source.embedding(u)
                if vector is not None and len(vector) == embedding_dim and np.all(np.isfinite(vector)):
                    out[i, start:start + embedding_dim] = vector
                    out[i, start + embedding_dim] = 1.0
    return out


def node_degrees(nodes: np.ndarray, source: GraphSource) -> np.ndarray:
    degrees_of = getattr(source, "degrees_of", None)
    if degrees_of is not None:
        return np.asarray(degrees_of(nodes), np.int64)
    return np.fromiter((source.degree(u) for u in nodes.tolist()), np.int64, len(nodes))


def _may_be_first(group: np.ndarray, keys: np.ndarray, groups: int, first: int,
                  always: np.ndarray | None = None) -> np.ndarray:
    """A mask of entries that holds every entry among the ``first`` smallest ``keys`` of its group (and every
    ``always`` entry), so that a sort of the kept entries picks exactly what a sort of all would. Keys are
    uniform 64-bit hashes: a group of n keeps those below ~3·first/n of the key range, ~3·first entries; a group
    where fewer than ``first`` of its other entries pass (p ~1e-5 each) keeps all of them. Sorting the kept few
    instead of every neighbour of 50 candidates was the token builder's largest sort."""
    sizes = np.bincount(group, minlength=groups)
    # threshold in the top 53 bits (exact in float64): 2^53 · min(1, 3·first / n)
    limit = np.minimum(1.0, 3.0 * first / np.maximum(sizes, 1)) * float(1 << 53)
    kept = (keys >> np.uint64(11)).astype(np.float64) < limit[group]
    if always is not None:
        kept |= always
        others = ~always
        need = np.minimum(np.bincount(group[others], minlength=groups), first)
        passed = np.bincount(group[kept & others], minlength=groups)
    else:
        need, passed = np.minimum(sizes, first), np.bincount(group[kept], minlength=groups)
    short = passed < need
    if short.any():
        kept |= short[group]
    return kept


def _by_group_then_key(group: np.ndarray, groups: int, keys: np.ndarray) -> np.ndarray:
    """``np.lexsort((keys, group))``: one sort of the keys, then a stable (radix, for ≤ 16-bit ints) sort by
    group. Equal to lexsort whenever no two entries of one group share a key (true here: a group's keys hash
    distinct node ids with one owner through a bijection, and a repeated id is a repeated entry)."""
    by_key = np.argsort(keys)
    small = np.int16 if groups < np.iinfo(np.int16).max else np.int64
    return by_key[np.argsort(group[by_key].astype(small), kind="stable")]


def _as_array(values: Collection[int]) -> np.ndarray:
    if isinstance(values, np.ndarray):
        return values.astype(np.int64, copy=False)
    return np.fromiter(values, np.int64, len(values))


class _Neighbours:
    """A node's neighbours as an int64 array, each read once per list. With ``visible_neighbours`` (the worker),
    a candidate whose row the reader does not hold gets its common neighbours with the query (which the query's
    mirrors do hold): the same rule offline, where every row is held, gives the full neighbourhood."""

    def __init__(self, source: GraphSource) -> None:
        self.source = source
        self.read = getattr(source, "visible_neighbours", None) or source.neighbours
        self.held: dict[int, np.ndarray] = {}

    def __call__(self, node: int) -> np.ndarray:
        ids = self.held.get(node)
        if ids is None:
            ids = self.held[node] = _as_array(self.read(node))
        return ids

    def of_candidate(self, user: int, candidate: int) -> np.ndarray:
        ids = self(candidate)
        if not len(ids) and self.source.degree(candidate) > 0:  # not held here: what the query's side shows
            ids = _as_array(self.source.common_neighbors(user, candidate))
        return ids


def build_list_tokens(source: GraphSource, user: int, candidates: Sequence[int] | np.ndarray, salt: int,
                      config: CrossAttentionConfig) -> ListTokens:
    """The tokens of every (user, candidate) pair of one list, sampled with ``salt`` (see the module doc). Reads
    the query's and the candidates' neighbours, the neighbours of the query-side tokens (the query's neighbours,
    whose rows a worker mirrors) and the query's 2-hop counts (Stage 1's traversal, held by the source)."""
    cands = np.asarray(candidates, np.int64)
    n_pairs = len(cands)
    f1, f2 = config.fanout
    read = _Neighbours(source)
    query_nb = read(user)
    cand_nb = [read.of_candidate(user, c) for c in cands.tolist()]
    salt_key = mix64(np.array([salt], np.int64).view(np.uint64))

    def owner_keys(owners: np.ndarray) -> np.ndarray:  # the owner's half of the sampler's key, once per owner
        return mix64(salt_key ^ owners.astype(np.int64).view(np.uint64))

    def first_per_pair(pair: np.ndarray, ids: np.ndarray, common: np.ndarray, keys: np.ndarray
                       ) -> tuple[np.ndarray, ...]:
        """Per pair, common neighbours first, then the rest, each by key: the first ``f1`` (and their ranks)."""
        kept = np.flatnonzero(_may_be_first(pair, keys, n_pairs, f1, common))
        pair, ids, common = pair[kept], ids[kept], common[kept]
        order = _by_group_then_key(pair * 2 + ~common, 2 * n_pairs, keys[kept])
        pair, ids, common = pair[order], ids[order], common[order]
        starts = np.zeros(n_pairs + 1, np.int64)
        np.cumsum(np.bincount(pair, minlength=n_pairs), out=starts[1:])
        rank = np.arange(len(pair)) - starts[pair]
        chosen = rank < f1
        return pair[chosen], ids[chosen], common[chosen], rank[chosen]

    # Candidate side: each candidate's neighbours; common = also a neighbour of the query.
    c_len = np.fromiter(map(len, cand_nb), np.int64, n_pairs)
    c_ids = np.concatenate(cand_nb) if n_pairs else np.zeros(0, np.int64)
    c_pair = np.repeat(np.arange(n_pairs), c_len)
    query_sorted = np.sort(query_nb)
    c_common = np.zeros(len(c_ids), bool)
    if len(query_sorted) and len(c_ids):
        c_common = query_sorted[np.minimum(np.searchsorted(query_sorted, c_ids), len(query_sorted) - 1)] == c_ids
    common_count = np.bincount(c_pair[c_common], minlength=n_pairs)
    # The candidates' edges, for "is w a neighbour of candidate p?" (sorted keys; a repeated candidate's repeats
    # do not change a membership test)
    cand_edge_key = mix64(cands.view(np.uint64))
    known = np.sort(cand_edge_key[c_pair] ^ c_ids.view(np.uint64))

    def adjacent(pair_of: np.ndarray, other_ids: np.ndarray) -> np.ndarray:
        """Whether ``other_ids[i]`` is a neighbour of candidate ``pair_of[i]``."""
        if not len(known) or not len(other_ids):
            return np.zeros(len(other_ids), bool)
        keys = cand_edge_key[pair_of] ^ other_ids.view(np.uint64)
        pos = np.minimum(np.searchsorted(known, keys), len(known) - 1)
        return known[pos] == keys

    c_keys = mix64(owner_keys(cands)[c_pair] ^ c_ids.view(np.uint64))
    candidate_tokens = first_per_pair(c_pair, c_ids, c_common, c_keys)
    # Query side: the pair's common neighbours, then the query's other neighbours in one key order shared by every
    # pair. Its first f1 always hold enough non-common ones (at most k of them are common when k are taken
    # first), so each pair needs only its commons and those f1, not the query's whole neighbourhood again.
    user_key = owner_keys(np.array([user], np.int64))
    query_keys = mix64(user_key ^ query_nb.view(np.uint64))
    head_at = np.argsort(query_keys, kind="stable")[:f1]
    head, head_keys = query_nb[head_at], query_keys[head_at]
    h_pair = np.repeat(np.arange(n_pairs), len(head))
    h_ids, h_keys = np.tile(head, n_pairs), np.tile(head_keys, n_pairs)
    h_rest = ~adjacent(h_pair, h_ids)  # the pair's commons among them come with the commons below
    com_ids = c_ids[c_common]
    q_pair = np.concatenate([c_pair[c_common], h_pair[h_rest]])
    q_ids = np.concatenate([com_ids, h_ids[h_rest]])
    q_common = np.concatenate([np.ones(len(com_ids), bool), np.zeros(int(h_rest.sum()), bool)])
    q_keys = np.concatenate([mix64(user_key ^ com_ids.view(np.uint64)), h_keys[h_rest]])
    query_tokens = first_per_pair(q_pair, q_ids, q_common, q_keys)
    # Segments 2p (query side of pair p, other endpoint = candidate p) and 2p+1 (candidate side, other = query).
    others = np.empty(2 * n_pairs, np.int64)
    others[0::2], others[1::2] = cands, user
    t_seg = np.concatenate([2 * query_tokens[0], 2 * candidate_tokens[0] + 1])
    t_node = np.concatenate([query_tokens[1], candidate_tokens[1]])
    t_common = np.concatenate([query_tokens[2], candidate_tokens[2]])
    t_rank = np.concatenate([query_tokens[3], candidate_tokens[3]])
    t_other = others[t_seg]
    query_side = t_seg % 2 == 0

    nodes = np.unique(np.concatenate([np.array([user], np.int64), cands, t_node]))
    degrees = node_degrees(nodes, source)
    t_row = np.searchsorted(nodes, t_node)
    bridges = np.zeros(len(t_node), np.float64)
    # Query side (a neighbour z of the query, other endpoint c): the share of z's own sample (``fanout[1]`` of its
    # neighbours, the sampler's bottom-k) adjacent to c, i.e. 3-paths query–z–w–c.
    hop1 = np.unique(t_node[query_side])
    if len(hop1) and f2:
        h_lists = [read(v) for v in hop1.tolist()]
        h_len = np.fromiter(map(len, h_lists), np.int64, len(h_lists))
        h_flat = np.concatenate(h_lists)
        h_seg = np.repeat(np.arange(len(hop1)), h_len)
        # bottom_k's own sample, given only the entries that can be in it (its keys, computed once per owner here)
        h_keys = mix64(owner_keys(hop1)[h_seg] ^ h_flat.view(np.uint64))
        sample2, _ = bottom_k(hop1, h_len, h_flat, salt, f2, keep=_may_be_first(h_seg, h_keys, len(hop1), f2))
        rows2 = sample2[np.searchsorted(hop1, t_node[query_side])]
        valid2 = rows2 >= 0
        bridge = np.zeros(rows2.shape, bool)
        if valid2.any():
            bridge[valid2] = adjacent(np.broadcast_to((t_seg[query_side] // 2)[:, None], rows2.shape)[valid2],
                                      rows2[valid2])
        bridges[query_side] = bridge.sum(axis=1) / f2
    # Candidate side (a neighbour v of the candidate, other endpoint the query): the exact share of v's neighbours
    # adjacent to the query, |N(v) ∩ N(query)| / deg(v), from the query's 2-hop counts (Stage 1 computed them).
    cand_side = ~query_side
    if cand_side.any():
        two_hop = source.two_hop_arrays(user)
        v = t_node[cand_side]
        counts = np.zeros(len(v), np.int64)
        if len(two_hop.ids):
            at = np.minimum(np.searchsorted(two_hop.ids, v), len(two_hop.ids) - 1)
            hit = two_hop.ids[at] == v
            counts[hit] = two_hop.counts[at[hit]]
        bridges[cand_side] = np.minimum(counts / np.maximum(degrees[t_row[cand_side]], 1), 1.0)
    t_distance = np.where(t_node == t_other, 0, np.where(t_common, 1, np.where(bridges > 0, 2, 3)))

    width = config.tokens
    node = np.full((n_pairs, width), -1, np.int32)
    side = np.zeros((n_pairs, width), np.int8)
    hop = np.zeros((n_pairs, width), np.int8)
    is_common = np.zeros((n_pairs, width), np.int8)
    distance = np.full((n_pairs, width), 3, np.int8)
    scalar = np.zeros((n_pairs, width), np.float32)
    node[:, 0] = np.searchsorted(nodes, user)
    node[:, 1] = np.searchsorted(nodes, cands)
    side[:, 1] = 1
    distance[:, 0] = distance[:, 1] = np.where(common_count > 0, 2, 3)
    scalar[:, 0] = scalar[:, 1] = np.log1p(common_count) / math.log1p(max(f1, 1))
    p_of, s_of = t_seg // 2, t_seg % 2
    slot = 2 + s_of * f1 + t_rank
    node[p_of, slot] = t_row
    side[p_of, slot] = s_of
    hop[p_of, slot] = 1
    is_common[p_of, slot] = t_common
    distance[p_of, slot] = t_distance
    scalar[p_of, slot] = bridges
    return ListTokens(nodes, node_inputs(nodes, source, config.embedding_dim, degrees), node, side, hop, is_common,
                      distance, scalar)


@dataclass(frozen=True)
class TokenBatch:
    """Tensors of one or more lists stacked: ``node`` indexes the stacked ``inputs``; ``tag`` is each token's
    structural tags as one index (:func:`tag_index`), so one embedding lookup adds them all."""

    inputs: torch.Tensor  # float32 [U, input_dim]
    node: torch.Tensor  # int64 [P, T], -1 = padding
    tag: torch.Tensor  # int64 [P, T] in [0, N_TAGS)
    scalar: torch.Tensor  # float32 [P, T]


N_TAGS = 2 * 2 * 2 * N_DISTANCES  # side × hop × is-common × distance


def tag_index(tokens: ListTokens) -> np.ndarray:
    return ((tokens.side.astype(np.int64) * 2 + tokens.hop) * 2 + tokens.common) * N_DISTANCES + tokens.distance


def make_batch(lists: Sequence[ListTokens]) -> TokenBatch:
    if len(lists) == 1:  # serving: one list, no copies to stack
        tokens = lists[0]
        return TokenBatch(torch.from_numpy(tokens.inputs), torch.from_numpy(tokens.node.astype(np.int64)),
                          torch.from_numpy(tag_index(tokens)), torch.from_numpy(tokens.scalar))
    offset = 0
    nodes = []
    for tokens in lists:
        nodes.append(np.where(tokens.node >= 0, tokens.node.astype(np.int64) + offset, -1))
        offset += len(tokens.nodes)
    return TokenBatch(torch.from_numpy(np.concatenate([t.inputs for t in lists]).astype(np.float32)),
                      torch.from_numpy(np.concatenate(nodes)), torch.from_numpy(np.concatenate([tag_index(t) for t in
                                                                                                lists])),
                      torch.from_numpy(np.concatenate([t.scalar for t in lists])))


class EncoderBlock(nn.Module):
    """A pre-norm transformer encoder layer (self-attention over all of a pair's tokens, padding masked by an additive
    bias, then a ReLU FFN) on plain matmuls: at 22 tokens per pair, ``nn.TransformerEncoderLayer``'s inference fast
    path spent a third of the forward in its masked softmax on CPU, and torch's CPU flash-attention kernel
    (``scaled_dot_product_attention``) took longer than the whole layer written out."""

    def __init__(self, d: int, heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.scale = 1.0 / math.sqrt(d // heads)
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, ffn_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn_dim, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        pairs, tokens, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(pairs, tokens, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        # Plain matmuls: at 22 tokens, torch's CPU flash-attention kernel took twice the whole layer's time.
        weights = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * self.scale + bias, dim=-1)
        attended = torch.matmul(self.drop(weights), v)
        x = x + self.drop(self.out(attended.transpose(1, 2).reshape(pairs, tokens, d)))
        return x + self.drop(self.ffn(self.norm2(x)))


class CrossAttentionRanker(nn.Module):
    def __init__(self, config: CrossAttentionConfig) -> None:
        super().__init__()
        self.config = config
        self.version: str | None = None
        d = config.d_model
        self.input = nn.Linear(config.input_dim, d)
        self.tag = nn.Embedding(N_TAGS, d)  # side × hop × is-common × distance: one table, one lookup
        self.scalar = nn.Linear(1, d)
        self.norm = nn.LayerNorm(d)
        self.encoder = nn.ModuleList(EncoderBlock(d, config.heads, config.ffn_dim, config.dropout)
                                     for _ in range(config.layers))
        self.head = nn.Sequential(nn.LayerNorm(3 * d), nn.Linear(3 * d, d), nn.ReLU(), nn.Linear(d, 1))

    def forward(self, batch: TokenBatch) -> torch.Tensor:
        """Scores ``[P]`` of the batch's pairs."""
        mask = batch.node >= 0
        projected = self.input(batch.inputs)
        x = projected[batch.node.clamp(min=0)]
        x = x + self.tag(batch.tag) + self.scalar(batch.scalar.unsqueeze(-1))
        x = self.norm(x) * mask.unsqueeze(-1)
        # Padding as an additive bias on the attention logits (a finite minimum, not -inf: a row is never all
        # padding, as the roots are always there, but -inf arithmetic would still be a NaN trap).
        bias = torch.zeros(mask.shape, dtype=x.dtype).masked_fill_(~mask, torch.finfo(x.dtype).min)[:, None, None, :]
        h = x
        for block in self.encoder:
            h = block(h, bias)
        weights = mask.unsqueeze(-1).to(h.dtype)
        mean = (h * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self.head(torch.cat([h[:, 0], h[:, 1], mean], dim=1)).squeeze(-1)

    def sampling_salt(self) -> int:
        """The sampler's salt: a hash of the model version (so the same version samples the same tokens)."""
        return salt_for_version(self.version or "cross-attention-untrained")

    @torch.inference_mode()
    def score_list(self, source: GraphSource, user: int, candidates: Sequence[int] | np.ndarray) -> np.ndarray:
        """Scores of ``candidates`` for ``user`` in one batched forward pass (float64 [n])."""
        if len(candidates) == 0:
            return np.empty(0)
        tokens = build_list_tokens(source, user, candidates, self.sampling_salt(), self.config)
        if not self.training:  # serving: already in eval mode (a train()/eval() pair walks every module, ~0.1 ms)
            return self(make_batch([tokens])).double().numpy()
        self.eval()
        try:
            return self(make_batch([tokens])).double().numpy()
        finally:
            self.train()


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
    if previous != SERVING_THREADS:
        torch.set_num_threads(SERVING_THREADS)
    try:
        scores = model.score_list(source, user, ids[head])
    finally:
        if previous != SERVING_THREADS:
            torch.set_num_threads(previous)
    order = rerank_top(head, scores, len(head))
    timings = dict(scored.timings)
    timings["rerank"] = (time.perf_counter() - started) * 1e3
    by_index = {int(i): float(s) for i, s in zip(head.tolist(), scores.tolist(), strict=True)}
    return dataclasses.replace(scored, top=order[:k], timings=timings), by_index


def mark_reranked(ranked: Any, rerank_scores: dict[int, float], candidate_index: dict[int, int], version: str
                  ) -> Any:
    """The items of a :class:`pymk.ranking.recommend.RankedList` with ``reasons["placed_by"]`` (the re-ranker's
    version, or "stage2" for an item below the re-ranked head). A re-ranked item's ``score`` becomes the re-ranker's
    (the score that placed it, so a list's scores stay in descending order: with ``top_n`` ≥ k every published item
    is in the head) and Stage 2's moves to ``reasons["stage2_score"]``; the reasons built from the features and the
    mutual connections stay as they are."""
    import dataclasses

    items = []
    for item in ranked.items:
        index = candidate_index.get(item.candidate.user)
        reasons = dict(item.reasons)
        score = item.score
        if index is not None and index in rerank_scores:
            reasons.update(placed_by=version, stage2_score=item.score)
            score = rerank_scores[index]
        else:
            reasons["placed_by"] = "stage2"
        items.append(dataclasses.replace(item, score=score, reasons=reasons))
    return dataclasses.replace(ranked, items=tuple(items))
