"""The cross-attention re-ranker (issue 22): shapes, invariance, deterministic sampling, a toy graph where only
*who* the shared neighbour is decides, and the leakage guard of its training replay. Pure and fast."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pymk.events import ConnectionEvent, Profile
from pymk.ranking.cross_attention import (
    CrossAttentionConfig,
    CrossAttentionRanker,
    ListTokens,
    build_list_tokens,
    listwise_loss,
    make_batch,
    rerank_top,
)
from pymk.ranking.cross_attention_training import RerankerTrainingConfig, build_rerank_data
from pymk.ranking.memory_source import MemorySource
from pymk.ranking.training_data import LeakageError
from pymk.reproducible import deterministic

SMALL = CrossAttentionConfig(d_model=16, layers=1, heads=2, ffn_dim=32, dropout=0.0, fanout=(4, 4))


def random_graph(seed: int = 0, users: int = 60, edges: int = 300) -> MemorySource:
    rng = np.random.default_rng(seed)
    source = MemorySource()
    for ts in range(edges):
        u, v = (int(x) for x in rng.integers(0, users, 2))
        if u != v:
            source.add_connection(u, v, ts)
    return source


def candidates_of(source: MemorySource, user: int, n: int = 8) -> list[int]:
    return [c for c in sorted(source.users()) if c != user and c not in source.neighbours(user)][:n]


def test_shapes() -> None:
    source = random_graph()
    cands = candidates_of(source, 0)
    tokens = build_list_tokens(source, 0, cands, salt=1, config=SMALL)
    assert tokens.node.shape == (len(cands), SMALL.tokens)
    assert tokens.inputs.shape == (len(tokens.nodes), SMALL.input_dim)
    assert (tokens.node[:, :2] >= 0).all() and (tokens.side[:, 1] == 1).all()
    assert tokens.distance.max() < 4 and tokens.scalar.min() >= 0
    model = CrossAttentionRanker(SMALL).eval()
    with torch.no_grad():
        scores = model(make_batch([tokens, tokens]))
    assert scores.shape == (2 * len(cands),)
    assert np.allclose(scores[: len(cands)], scores[len(cands):], atol=1e-6)  # batching does not change a list
    assert model.score_list(source, 0, cands).shape == (len(cands),)


def _permuted(tokens: ListTokens, rng: np.random.Generator) -> ListTokens:
    """Each side's neighbour tokens shuffled within that side (roots stay at slots 0 and 1)."""
    f1 = SMALL.fanout[0]
    perm = np.arange(SMALL.tokens)
    perm[2:2 + f1] = 2 + rng.permutation(f1)
    perm[2 + f1:] = 2 + f1 + rng.permutation(f1)
    fields = {name: getattr(tokens, name)[:, perm] for name in ("node", "side", "hop", "common", "distance",
                                                                  "scalar")}
    return ListTokens(tokens.nodes, tokens.inputs, **fields)


def test_permutation_invariance_over_neighbours() -> None:
    source = random_graph(1)
    tokens = build_list_tokens(source, 3, candidates_of(source, 3), salt=7, config=SMALL)
    model = CrossAttentionRanker(SMALL).eval()
    with torch.no_grad():
        before = model(make_batch([tokens]))
        after = model(make_batch([_permuted(tokens, np.random.default_rng(0))]))
    assert torch.allclose(before, after, atol=1e-5)


def test_sampler_is_deterministic_per_model_version() -> None:
    source = random_graph(2, users=40, edges=600)  # degrees well above the fanout: sampling matters
    cands = candidates_of(source, 5)
    model = CrossAttentionRanker(SMALL)
    model.version = "xattn-a"
    first = build_list_tokens(source, 5, cands, model.sampling_salt(), SMALL)
    again = build_list_tokens(source, 5, list(cands), model.sampling_salt(), SMALL)
    assert np.array_equal(first.nodes[first.node.clip(0)], again.nodes[again.node.clip(0)])
    model.version = "xattn-b"
    other = build_list_tokens(source, 5, cands, model.sampling_salt(), SMALL)
    assert not np.array_equal(first.nodes[first.node.clip(0)], other.nodes[other.node.clip(0)])


def test_common_neighbours_are_sampled_first() -> None:
    source = MemorySource()
    for friend in range(100, 130):  # user 0 has 30 friends, one of them (129) shared with candidate 1
        source.add_connection(0, friend, friend)
    source.add_connection(1, 129, 200)
    tokens = build_list_tokens(source, 0, [1], salt=3, config=SMALL)
    query_side = tokens.nodes[tokens.node[0, 2:2 + SMALL.fanout[0]]]
    assert 129 in query_side.tolist()
    assert tokens.common[0].sum() == 2 and tokens.distance[0, 0] == 2


BOSS = Profile(title="boss")


def boss_graph(seed: int) -> tuple[MemorySource, list[tuple[int, list[int], int]]]:
    """Queries with two candidates, each with exactly one common neighbour and the same degrees: only the
    *type* of the shared neighbour (a boss profile or a plain one) says who connects."""
    rng = np.random.default_rng(seed)
    source = MemorySource()
    lists = []
    node = 1000
    for q in range(40):
        query, boss, peer, good, bad = node, node + 1, node + 2, node + 3, node + 4
        node += 5
        source.set_profile(boss, BOSS)
        for a, b in ((query, boss), (query, peer), (good, boss), (bad, peer)):
            source.add_connection(a, b, q)
        pair = [good, bad] if rng.random() < 0.5 else [bad, good]
        lists.append((query, pair, good))
    return source, lists


def test_toy_graph_where_the_shared_boss_decides() -> None:
    config = CrossAttentionConfig(d_model=16, layers=1, heads=2, ffn_dim=32, dropout=0.0, fanout=(4, 4))
    source, lists = boss_graph(0)
    data = [(build_list_tokens(source, q, pair, 11, config), np.array([float(c == good) for c in pair],
                                                                        np.float32)) for q, pair, good in lists]
    # Counts cannot tell them apart: same degree, one common neighbour each.
    for tokens, _ in data:
        assert tokens.scalar[0, 0] == tokens.scalar[1, 0]
    train, val = data[:30], data[30:]
    with deterministic(0, threads=1):
        model = CrossAttentionRanker(config)
        optimiser = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(60):
            scores = model(make_batch([t for t, _ in train]))
            loss = listwise_loss(scores, torch.from_numpy(np.concatenate([y for _, y in train])), [2] * len(train))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        model.eval()
        with torch.no_grad():
            scores = model(make_batch([t for t, _ in val])).numpy().reshape(-1, 2)
    labels = np.stack([y for _, y in val])
    assert (scores.argmax(1) == labels.argmax(1)).all()


def test_replay_refuses_a_leaky_source(monkeypatch: pytest.MonkeyPatch) -> None:
    events = [ConnectionEvent(u, v, "add", ts * 86_400_000)
              for ts, (u, v) in enumerate([(1, 2), (2, 3), (3, 4), (1, 3), (4, 5), (2, 5), (1, 4), (3, 5)] * 3)]
    config = RerankerTrainingConfig(model=SMALL, checkpoint_fractions=(0.5, 0.8))
    build_rerank_data(events, config, salt=1)  # a clean replay passes the guard

    real = MemorySource.apply

    def leaky_apply(self: MemorySource, event: object) -> None:  # also sees the event one day later
        real(self, event)  # type: ignore[arg-type]
        self._seen(event.ts + 86_400_000)  # type: ignore[attr-defined]

    monkeypatch.setattr(MemorySource, "apply", leaky_apply)
    with pytest.raises(LeakageError):
        build_rerank_data(events, config, salt=1)


def test_rerank_top_keeps_the_tail() -> None:
    order = np.array([4, 2, 0, 1, 3])
    assert rerank_top(order, np.array([0.1, 0.9, 0.5]), 3).tolist() == [2, 0, 4, 1, 3]


def _saved_model(directory: Path, seed: int) -> str:
    from pymk.ranking.cross_attention import save_model

    with deterministic(seed, threads=1):
        model = CrossAttentionRanker(SMALL)
    model.version = f"xattn-test-{seed}"
    save_model(model, directory / model.version)
    return model.version


def test_serving_default_has_no_reranker_and_hot_reload_follows_current(tmp_path: Path) -> None:
    from pymk.settings import Settings
    from pymk.streams.models import Models
    from pymk.train import point_current

    assert Settings.from_env({}, home=tmp_path).reranker == "none"
    plain = Models(Settings.from_env({}, home=tmp_path))
    assert plain.reranker is None and "+" not in plain.ranker_version
    kind_dir = tmp_path / "models" / "reranker"
    first = _saved_model(kind_dir, 1)
    point_current(kind_dir / first)
    models = Models(Settings.from_env({"PYMK_RERANKER": "cross-attention"}, home=tmp_path))
    assert models.reranker.version == first and models.ranker_version.endswith(f"+{first}")
    assert models.reload_if_changed() == {}
    second = _saved_model(kind_dir, 2)
    point_current(kind_dir / second)
    assert models.reload_if_changed() == {"reranker": second}
    assert models.ranker_version.endswith(f"+{second}")


def test_rerank_scored_reorders_the_head_and_names_the_model() -> None:
    from pymk.ranking.candidates import CandidateConfig
    from pymk.ranking.cross_attention import mark_reranked, rerank_scored
    from pymk.ranking.heuristic import HeuristicScorer
    from pymk.ranking.recommend import rank_scored, score_candidates

    source = random_graph(4, users=80, edges=500)
    scorer = HeuristicScorer()
    scored = score_candidates(0, source, scorer, CandidateConfig(), 10_000, k=5)
    model = CrossAttentionRanker(replace(SMALL, top_n=10)).eval()
    model.version = "xattn-test"
    reranked, scores = rerank_scored(0, scored, source, model, 5)
    assert len(scores) == min(10, len(scored.candidates)) and "rerank" in reranked.timings
    assert set(reranked.top.tolist()) <= set(scores)
    assert [scores[i] for i in reranked.top.tolist()] == sorted((scores[i] for i in reranked.top.tolist()),
                                                                reverse=True)
    ranked = rank_scored(0, reranked, source, scorer, 10_000)
    index_of = {int(reranked.candidates.ids[i]): int(i) for i in reranked.top.tolist()}
    marked = mark_reranked(ranked, scores, index_of, model.version)
    for item in marked.items:
        assert item.reasons["placed_by"] == "xattn-test"
        assert item.score == scores[index_of[item.candidate.user]]  # the score that placed it
        assert item.reasons["stage2_score"] == ranked.items[item.rank - 1].score
        assert set(ranked.items[item.rank - 1].reasons) <= set(item.reasons)  # feature/mutual reasons kept


def test_holdout_replay_hides_its_fold_and_refuses_a_leaky_source(monkeypatch: pytest.MonkeyPatch) -> None:
    """A random split's lists: each fold of the hidden pairs is hidden from the graph its lists are built on."""
    import pymk.ranking.training_data as training  # the fold's graph is the ranker's (holdout_fold)

    source = random_graph(5, users=50, edges=400)
    events = [ConnectionEvent(u, v, "add", ts) for ts, (u, v) in enumerate(
        sorted({(min(u, v), max(u, v)) for u in source.users() for v in source.neighbours(u)}))]
    config = RerankerTrainingConfig(model=replace(SMALL, top_n=10), replay="holdout", holdout_queries=40)
    data = build_rerank_data(events, config, salt=1)
    assert data.train and data.val and data.stats["replay"] == "holdout"
    assert len(data.stats["checkpoints"]) == config.holdout_folds
    monkeypatch.setattr(training, "visible_events", lambda events, hidden: list(events))  # the fold stays visible
    with pytest.raises(LeakageError):
        build_rerank_data(events, config, salt=1)


class PartitionView(MemorySource):
    """What a worker holds: its users' rows and the mirrors of their neighbours; ``neighbours`` of any other
    node is an error there (OwnershipError), ``visible_neighbours`` is empty."""

    def __init__(self, full: MemorySource, local: set[int]) -> None:
        super().__init__()
        self.adjacency = full.adjacency
        self.local = local
        self.held = local | {n for u in local for n in full.neighbours(u)}

    def neighbours(self, user: int) -> set[int]:
        if user not in self.local:
            raise AssertionError(f"read {user}'s row outside the partition")
        return self.adjacency.get(user, set())

    def visible_neighbours(self, node: int) -> np.ndarray:
        return np.array(sorted(self.adjacency.get(node, ()) if node in self.held else ()), np.int64)

    def common_neighbors(self, user: int, candidate: int) -> list[int]:  # from the query's neighbours' mirrors
        return sorted(z for z in self.neighbours(user) if candidate in self.adjacency[z])


def test_tokens_come_from_what_a_partition_holds() -> None:
    full = random_graph(6, users=60, edges=260)
    user = 0
    view = PartitionView(full, local={user, 1, 2})
    cands = [c for c in candidates_of(full, user, 30) if c not in view.held][:6]
    assert cands
    tokens = build_list_tokens(view, user, cands, salt=2, config=SMALL)  # no row read outside the partition
    for p, candidate in enumerate(cands):
        candidate_side = tokens.nodes[tokens.node[p, 2 + SMALL.fanout[0]:].clip(0)][tokens.node[p, 2 + SMALL.fanout[0]:]
                                                                                      >= 0]
        # a candidate whose row is not held shows its common neighbours with the query (the query's mirrors)
        assert set(candidate_side.tolist()) <= set(full.neighbours(user)) & set(full.neighbours(candidate))


def test_reranker_validation_picks_it_only_on_a_gain(tmp_path: Path) -> None:
    import json

    from pymk.ranking.cross_attention_eval import reranker_validation

    # (before, after, the gain's standard error (None: a model saved before it was recorded), the pick)
    for before, after, error, picks in ((0.10, 0.12, None, "cross-attention"), (0.12, 0.12, None, "none"),
                                        (0.12, 0.10, None, "none"), (0.10, 0.12, 0.005, "cross-attention"),
                                        (0.10, 0.12, 0.0125, "none"), (0.12, 0.10, 0.001, "none")):
        metadata = {"version": "xattn-x", "stage2_val_recall_at_20": before, "val_recall_at_20": after,
                    "best_epoch": 2, "epochs_run": 5, "data_stats": {"train_lists": 30, "val_lists": 10}}
        if error is not None:
            metadata["val_gain_standard_error"] = error
        (tmp_path / "metadata.json").write_text(json.dumps(metadata))
        summary = reranker_validation(tmp_path)
        assert summary["validation_picks"] == picks, (before, after, error)
        assert (summary["val_recall_at_20_stage2"], summary["val_recall_at_20"]) == (before, after)


def test_paired_gain_is_the_mean_difference_and_its_standard_error() -> None:
    from pymk.ranking.cross_attention_training import paired_gain

    after, before = np.array([0.5, 0.2, 0.0, 1.0]), np.array([0.25, 0.2, 0.0, 0.75])
    gain, error = paired_gain(after, before)
    differences = after - before
    assert gain == pytest.approx(differences.mean())
    assert error == pytest.approx(differences.std(ddof=1) / 2.0)
    assert paired_gain(np.ones(3), np.ones(3)) == (0.0, 0.0)
    assert math.isnan(paired_gain(np.ones(1), np.zeros(1))[1])
