"""The common-neighbour structure columns (:func:`pymk.ranking.features.structure_columns`) against their
definitions, computed pair by pair from the adjacency sets, and their choice by validation Recall@20."""

from __future__ import annotations

import random

import numpy as np

from pymk.ranking.candidates import CandidateConfig, generate_candidates
from pymk.ranking.features import (
    FEATURE_INDEX,
    N_FEATURES,
    STRUCTURE_FEATURES,
    FeatureBuilder,
    structure_columns,
    structure_columns_numpy,
)
from pymk.ranking.memory_source import MemorySource
from pymk.ranking.model import Ranker, RankerConfig
from pymk.ranking.source import EgoAdjacency
from pymk.ranking.training_data import RankingCase, ValidationLists, choose_structure_columns, without_structure
from pymk.ranking.tree_eval import feature_kernels


def random_graph(users: int, edges: int, seed: int) -> MemorySource:
    rng = random.Random(seed)
    source = MemorySource()
    for _ in range(edges):
        u, v = rng.randrange(users), rng.randrange(users)
        if u != v:
            source.add_connection(u, v)
    return source


def by_definition(source: MemorySource, user: int, candidate: int) -> list[float]:
    adjacency = source.adjacency
    common = sorted(adjacency[user] & adjacency[candidate])
    degrees = [len(adjacency[z]) for z in common]
    inside = [len(adjacency[z] & adjacency[user]) for z in common]
    return [sum(d <= 4 for d in degrees), sum(5 <= d <= 16 for d in degrees), sum(17 <= d <= 64 for d in degrees),
            sum(d > 64 for d in degrees), min(degrees, default=np.nan), max(degrees, default=np.nan), sum(inside),
            sum(i / d for i, d in zip(inside, degrees, strict=True)),
            len(common) / len(adjacency[candidate]) if adjacency[candidate] else 0.0,
            len(common) / len(adjacency[user])]


def test_columns_follow_their_definitions_in_the_matrix() -> None:
    source = random_graph(120, 900, seed=3)
    builder = FeatureBuilder()
    columns = [FEATURE_INDEX[name] for name in STRUCTURE_FEATURES]
    for user in range(0, 120, 5):
        candidates = generate_candidates(user, source, CandidateConfig(ann_k=0), 0)
        if not len(candidates):
            continue
        matrix = builder.matrix(user, candidates, source, 0)
        for row, candidate in enumerate(candidates.ids.tolist()):
            np.testing.assert_allclose(matrix[row, columns], by_definition(source, user, candidate), rtol=1e-12,
                                       equal_nan=True, err_msg=f"{user} → {candidate}")


def test_columns_follow_their_definitions() -> None:
    source = random_graph(120, 900, seed=3)
    for user in range(0, 120, 5):
        if not source.adjacency.get(user):
            continue
        ids = np.array([c for c in source.adjacency if c != user and c not in source.adjacency[user]], np.int64)
        np.random.default_rng(user).shuffle(ids)  # the columns do not depend on the candidates' order
        got = structure_columns(source.ego_adjacency(user), ids)
        for row, candidate in enumerate(ids.tolist()):
            np.testing.assert_allclose(got[row], by_definition(source, user, candidate)[:8], rtol=1e-12,
                                       equal_nan=True, err_msg=f"{user} → {candidate}")


def test_degree_bands_sum_to_the_common_neighbour_count_in_the_matrix() -> None:
    source = random_graph(200, 1500, seed=4)
    builder = FeatureBuilder()
    for user in range(0, 200, 17):
        candidates = generate_candidates(user, source, CandidateConfig(ann_k=0), 0)
        if not len(candidates):
            continue
        matrix = builder.matrix(user, candidates, source, 0)
        bands = [FEATURE_INDEX[name] for name in STRUCTURE_FEATURES[:4]]
        np.testing.assert_array_equal(matrix[:, bands].sum(axis=1), matrix[:, FEATURE_INDEX["common_neighbor_count"]])


def test_no_neighbours_and_no_candidates() -> None:
    empty = structure_columns(EgoAdjacency.empty(), np.array([3, 4], np.int64))
    assert empty.shape == (2, 8)
    assert np.isnan(empty[:, 4:6]).all() and not np.isnan(np.delete(empty, [4, 5], axis=1)).any()
    assert structure_columns(EgoAdjacency.empty(), np.empty(0, np.int64)).shape == (0, 8)


def test_the_compiled_pass_gives_numpy_bits() -> None:
    """The C pass (tree_eval.c) against the numpy reference, bit for bit, on awkward inputs too: ids listed twice,
    ids far apart (hash collisions), 2-paths that reach no candidate, neighbours of degree 0, the query's own
    friends among the candidates (their in-circle paths)."""
    assert feature_kernels() is not None, "gcc is there in CI: the compiled pass must be the one tested"
    rng = np.random.default_rng(7)
    for case in range(300):
        m = int(rng.integers(0, 40))
        universe = rng.choice(2**62, size=200, replace=False) if case % 3 == 0 else np.arange(200, dtype=np.int64)
        middles = np.sort(rng.choice(universe, size=m, replace=False)).astype(np.int64)
        sizes = rng.integers(0, 90, size=m).astype(np.int64) * (rng.random(m) > 0.1)
        others = rng.choice(universe, size=int(sizes.sum())).astype(np.int64)
        ids = rng.choice(universe, size=int(rng.integers(0, 120))).astype(np.int64)  # with repeats
        ego = EgoAdjacency(middles, sizes, others)
        expected = structure_columns_numpy(ego, ids)
        got = structure_columns(ego, ids)
        assert got.shape == expected.shape
        assert np.array_equal(got.view(np.int64), expected.view(np.int64)), case  # NaN payloads included


def lists_and_rows(signal_column: int, queries: int = 60, per_query: int = 40, seed: int = 0
                   ) -> tuple[np.ndarray, np.ndarray, ValidationLists]:
    """Rows whose label depends on one column only, and validation lists of the same law."""
    rng = np.random.default_rng(seed)

    def rows(n: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.random((n, N_FEATURES))
        return x, (x[:, signal_column] > 0.8).astype(np.float64)

    x, y = rows(queries * per_query)
    cases = []
    for q in range(queries):
        features, labels = rows(per_query)
        cases.append(RankingCase(q, np.arange(per_query, dtype=np.int64), features, labels > 0,
                                 max(1, int(labels.sum()))))
    return x, y, ValidationLists(cases, 20)


def test_validation_keeps_the_structure_columns_only_when_they_rank_better() -> None:
    config = RankerConfig(n_estimators=30, early_stopping_rounds=None)
    structure = FEATURE_INDEX["ego_three_path_count"]
    x, y, lists = lists_and_rows(structure)
    with_it = Ranker.train(x, y, config=config)
    without = Ranker.train(without_structure(x), y, config=config)
    chosen, evidence = choose_structure_columns(with_it, without, lists)
    assert evidence["decision"] == "kept" and chosen is with_it
    assert evidence["val_recall_at_20_with"] > evidence["val_recall_at_20_without"]
    # the model trained without them never reads them
    assert all(without.feature_importances()[name] == 0.0 for name in STRUCTURE_FEATURES)

    x, y, lists = lists_and_rows(FEATURE_INDEX["common_neighbor_count"])
    same = Ranker.train(x, y, config=config)
    chosen, evidence = choose_structure_columns(same, same, lists)  # a tie: the simpler model
    assert evidence["decision"] == "dropped" and evidence["gain"] == 0.0


def test_a_ranker_that_dropped_the_columns_scores_the_same_without_them() -> None:
    """The shipped ranker dropped them on validation: the worker then skips them (~1 ms a list), and the scores
    are the same bits; fill_structure gives a logged row the values the full matrix would have."""
    from pymk.paths import bundled_data
    from pymk.ranking.recommend import score_candidates

    ranker = Ranker.load(bundled_data("models/ranker"))
    assert ranker.metadata["structure_columns"]["decision"] == "dropped" and not ranker.reads_structure_columns
    source = random_graph(150, 1400, seed=5)
    computed, skipped = FeatureBuilder(), FeatureBuilder()
    skipped.structure = False
    config = CandidateConfig(ann_k=0)
    columns = [FEATURE_INDEX[name] for name in STRUCTURE_FEATURES[:-2]]
    for user in range(0, 150, 7):
        full = score_candidates(user, source, ranker, config, 0, k=20, builder=computed)
        lean = score_candidates(user, source, ranker, config, 0, k=20, builder=skipped)
        if not len(full.candidates):
            continue
        assert np.array_equal(full.scores, lean.scores) and np.array_equal(full.top, lean.top)
        assert np.isnan(lean.features[:, columns]).all()
        rows = lean.features[full.top].copy()
        skipped.fill_structure(user, lean.candidates.ids[full.top], source, rows)
        np.testing.assert_array_equal(rows, full.features[full.top])
