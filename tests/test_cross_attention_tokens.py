"""The cross-attention re-ranker's vectorised token builder against a plain per-pair reference written from the
module doc (each pair on its own, every neighbour list sorted in full): the same tokens and, on a fixed model, the
same scores. Guards the builder's speed-ups (a sort of only the entries that can come first, a key sort plus a
stable sort by group, profile codes cached by object identity), which must not change what the model sees."""

from __future__ import annotations

import math

import numpy as np
import torch

from pymk.events import Profile
from pymk.index.node_features import encode_degrees, encode_profile_compact
from pymk.index.sampling import mix64, sample_neighbours
from pymk.ranking.cross_attention import (
    CrossAttentionConfig,
    CrossAttentionRanker,
    ListTokens,
    ProfileCodes,
    _by_group_then_key,
    _may_be_first,
    build_list_tokens,
    make_batch,
)
from pymk.ranking.memory_source import MemorySource

SCORE_TOLERANCE = 1e-6  # float32 scores of order 0.1-1; the same tokens give the same sums, this allows for none


def sampler_key(salt: int, owner: int, node: int) -> int:
    """The sampler's bottom-k key of ``node`` among ``owner``'s neighbours (pymk.index.sampling.bottom_k)."""
    salt_key = mix64(np.array([salt], np.int64).view(np.uint64))
    owner_key = mix64(salt_key ^ np.array([owner], np.int64).view(np.uint64))
    return int(mix64(owner_key ^ np.array([node], np.int64).view(np.uint64))[0])


def reference_tokens(source: MemorySource, user: int, candidates: list[int], salt: int,
                     config: CrossAttentionConfig) -> list[list[tuple[int, int, int, int, int, float]]]:
    """Per pair, its tokens in slot order as (node, side, hop, common, distance, scalar): the module doc's rules,
    one pair at a time."""
    f1, f2 = config.fanout
    query_nb = set(source.neighbours(user))
    out = []
    for candidate in candidates:
        cand_nb = set(source.neighbours(candidate))
        commons = query_nb & cand_nb
        root_distance = 2 if commons else 3
        root_scalar = math.log1p(len(commons)) / math.log1p(max(f1, 1))
        tokens = [(user, 0, 0, 0, root_distance, root_scalar), (candidate, 1, 0, 0, root_distance, root_scalar)]
        for side, owner, owned, other in ((0, user, query_nb, candidate), (1, candidate, cand_nb, user)):
            chosen = sorted(owned, key=lambda n, owner=owner: (n not in commons, sampler_key(salt, owner, n)))[:f1]
            for node in chosen:
                if side == 0:  # share of the node's own hop-2 sample adjacent to the candidate
                    sample = sample_neighbours(node, source.neighbours(node), f2, salt)
                    bridge = sum(w in cand_nb for w in sample) / f2 if f2 else 0.0
                else:  # |N(v) ∩ N(query)| / deg(v), as the query's 2-hop counts give it (0 for its neighbours)
                    shared = 0 if node in query_nb or node == user else len(set(source.neighbours(node)) & query_nb)
                    bridge = min(shared / max(source.degree(node), 1), 1.0)
                distance = 0 if node == other else 1 if node in commons else 2 if bridge > 0 else 3
                tokens.append((node, side, 1, int(node in commons), distance, bridge))
        out.append(tokens)
    return out


def reference_inputs(source: MemorySource, nodes: np.ndarray, embedding_dim: int) -> np.ndarray:
    rows = []
    for node in nodes.tolist():
        vector = source.embedding(node) if embedding_dim else None
        has = vector is not None and len(vector) == embedding_dim
        embedding = np.asarray(vector, np.float32) if has else np.zeros(embedding_dim, np.float32)
        rows.append(np.concatenate([encode_profile_compact(source.profile(node)),
                                    encode_degrees(np.array([source.degree(node)]))[0], embedding,
                                    [1.0 if has else 0.0]]))
    return np.asarray(rows, np.float32)


def as_reference_list(reference: list[list[tuple[int, int, int, int, int, float]]], source: MemorySource,
                      config: CrossAttentionConfig) -> ListTokens:
    """The reference tokens as a ListTokens (rows of a node table of the reference's own making)."""
    nodes = np.unique([token[0] for pair in reference for token in pair]).astype(np.int64)
    shape = (len(reference), config.tokens)
    node, side, hop = np.full(shape, -1, np.int32), np.zeros(shape, np.int8), np.zeros(shape, np.int8)
    common, distance = np.zeros(shape, np.int8), np.full(shape, 3, np.int8)
    scalar = np.zeros(shape, np.float32)
    f1 = config.fanout[0]
    for p, tokens in enumerate(reference):
        taken = [0, 0]  # hop-1 tokens placed per side
        for i, (n, s, h, c, d, x) in enumerate(tokens):
            slot = i if h == 0 else 2 + s * f1 + taken[s]
            taken[s] += h
            node[p, slot] = np.searchsorted(nodes, n)
            side[p, slot], hop[p, slot], common[p, slot], distance[p, slot], scalar[p, slot] = s, h, c, d, x
    return ListTokens(nodes, reference_inputs(source, nodes, config.embedding_dim), node, side, hop, common,
                      distance, scalar)


def dense_graph(seed: int, users: int = 90, edges: int = 2500, embedding_dim: int = 8) -> MemorySource:
    """Degrees ~50: many neighbour lists well past 3 × fanout, so the builder's pre-sort cut does real work."""
    rng = np.random.default_rng(seed)
    source = MemorySource(dim=embedding_dim)
    for ts in range(edges):
        u, v = (int(x) for x in rng.integers(0, users, 2))
        if u != v:
            source.add_connection(u, v, ts)
    for user in range(0, users, 2):
        source.set_profile(user, Profile(company=f"c{user % 5}", school=f"s{user % 3}", skills=("a", f"k{user % 4}")))
    source.set_embeddings({u: rng.normal(size=embedding_dim).astype(np.float32) for u in range(0, users, 3)})
    return source


def test_builder_gives_the_reference_tokens_and_scores() -> None:
    for seed, fanout in ((0, (10, 10)), (1, (4, 4)), (2, (3, 0))):
        source = dense_graph(seed)
        config = CrossAttentionConfig(fanout=fanout, embedding_dim=8, dropout=0.0)
        torch.manual_seed(seed)
        model = CrossAttentionRanker(config).eval()
        model.version = f"xattn-test-{seed}"
        salt = model.sampling_salt()
        for user in (0, 7, 31):
            candidates = [c for c in sorted(source.users()) if c != user][:40]  # some are neighbours, some hubs
            built = build_list_tokens(source, user, candidates, salt, config)
            reference = reference_tokens(source, user, candidates, salt, config)
            for p, tokens in enumerate(reference):
                slots = np.flatnonzero(built.node[p] >= 0)
                assert len(slots) == len(tokens), (seed, user, p)
                got = [(int(built.nodes[built.node[p, s]]), int(built.side[p, s]), int(built.hop[p, s]),
                        int(built.common[p, s]), int(built.distance[p, s])) for s in slots]
                assert got == [t[:5] for t in tokens], (seed, user, p)
                assert np.allclose(built.scalar[p, slots], [t[5] for t in tokens], atol=1e-7)
            expected = as_reference_list(reference, source, config)
            assert np.array_equal(built.inputs[built.node[built.node >= 0]],
                                  expected.inputs[expected.node[expected.node >= 0]])
            with torch.inference_mode():
                fast = model(make_batch([built])).numpy()
                plain = model(make_batch([expected])).numpy()
            assert np.abs(fast - plain).max() <= SCORE_TOLERANCE
            assert np.array_equal(model.score_list(source, user, candidates), fast.astype(np.float64))


def test_profile_codes_follow_a_changed_profile() -> None:
    codes = ProfileCodes(capacity=4)
    first, second = Profile(company="a"), Profile(company="b", school="x")
    assert np.array_equal(codes.gather([1, 2], [first, None]),
                          np.stack([encode_profile_compact(first), encode_profile_compact(None)]))
    assert np.array_equal(codes.gather([1], [second])[0], encode_profile_compact(second))  # a new object: re-coded
    many = [Profile(company=str(i)) for i in range(4)]
    assert np.array_equal(codes.gather([5, 6, 7, 8], many), np.stack([encode_profile_compact(p) for p in many]))
    assert len(codes.rows) == 4  # over capacity: started over


def first_per_group(order: np.ndarray, group: np.ndarray, groups: int, first: int) -> list[list[int]]:
    by_group: list[list[int]] = [[] for _ in range(groups)]
    for entry in order.tolist():
        if len(by_group[group[entry]]) < first:
            by_group[group[entry]].append(entry)
    return by_group


def test_presort_cut_and_group_sort_pick_what_a_full_lexsort_picks() -> None:
    rng = np.random.default_rng(3)
    for groups, first in ((3, 10), (7, 3), (50, 10)):
        sizes = rng.integers(60, 200, groups)
        sizes[0] = 0  # an empty group
        group = np.repeat(np.arange(groups), sizes)
        keys = rng.integers(0, np.iinfo(np.int64).max, len(group)).astype(np.uint64) * np.uint64(2)
        always = rng.random(len(group)) < 0.05
        # adversarial: a group whose keys all sit above its threshold, so the cut must fall back to all of it
        keys[group == groups - 1] |= np.uint64(1 << 63)
        for common in (None, always):
            composite = group if common is None else group * 2 + ~common
            full = np.lexsort((keys, composite))
            assert np.array_equal(_by_group_then_key(composite, 2 * groups, keys), full)
            kept = np.flatnonzero(_may_be_first(group, keys, groups, first, common))
            cut = kept[_by_group_then_key(composite[kept], 2 * groups, keys[kept])]
            assert first_per_group(cut, group, groups, first) == first_per_group(full, group, groups, first)
            assert len(kept) < len(group)  # the cut did cut
