"""The two-tower ranker: tower shapes and determinism, the three losses against hand computations, training on a
small planted-partition graph with profiles, save/load, the leakage guards, inputs and the score blend."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from pymk.events import Profile
from pymk.index.embedder import Embedder, salt_for_version
from pymk.index.memory_graph import AdjacencyGraph
from pymk.index.node_features import encode_degrees, encode_profile_compact, profile_flags
from pymk.index.sage import GraphSage, SageConfig, save_model
from pymk.learning import roc_auc_of
from pymk.ranking.two_tower import (
    INPUT_DIM,
    LeakageError,
    TowerConfig,
    TwoTowerConfig,
    TwoTowerModel,
    TwoTowerRanker,
    TwoTowerResult,
    binary_loss,
    blend_scores,
    check_sage_before,
    fit_platt,
    hardest_negatives,
    in_batch_softmax_loss,
    load_two_tower,
    save_two_tower,
    tower_inputs,
    train_two_tower,
    triplet_loss,
)

torch.set_num_threads(1)

COMMUNITIES, SIZE = 4, 30


# ---- fixtures -----------------------------------------------------------------------------------------------------
def planted_partition(seed: int = 0) -> tuple[list[tuple[int, int, int]], dict[int, Profile], np.ndarray]:
    """Connections (u, v, ts) at random times, one company and school per community, each user's community."""
    rng = np.random.default_rng(seed)
    community = np.arange(COMMUNITIES * SIZE) // SIZE
    connections = []
    for u in range(community.shape[0]):
        for v in range(u + 1, community.shape[0]):
            if rng.random() < (0.25 if community[u] == community[v] else 0.01):
                connections.append((u, v, int(rng.integers(1, 10**9))))
    profiles = {u: Profile(company=f"company {c}", school=f"school {c}", industry=None, title=None, skills=None,
                           geo=None) for u, c in enumerate(community.tolist())}
    return connections, profiles, community


def save_sage(directory: Path, train_end_ts: int | None = -1) -> Path:
    """An untrained small GraphSAGE (the towers learn from the profiles), saved with a training end ts."""
    torch.manual_seed(0)
    model = GraphSage(SageConfig(hidden_dim=32, embedding_dim=128, fanout=(5, 5), identity_dim=8))
    model.eval()
    metadata = {} if train_end_ts is None else {"train_end_ts": train_end_ts}
    save_model(model, directory, metadata)
    return directory


def small_config(**overrides: object) -> TwoTowerConfig:
    settings: dict[str, object] = dict(epochs=6, batch_size=256, min_steps_per_epoch=6, extra_negatives=64,
                                       progress=False, patience=6, val_fraction=0.15)
    settings.update(overrides)
    return TwoTowerConfig(**settings)  # type: ignore[arg-type]


class TableSource:
    """embedding / profile / degree of a graph with precomputed embeddings (a RankingSource-like source)."""

    def __init__(self, graph: AdjacencyGraph, vectors: dict[int, np.ndarray]) -> None:
        self.graph, self.vectors = graph, vectors

    def embedding(self, user: int) -> np.ndarray | None:
        return self.vectors.get(user)

    def profile(self, user: int) -> Profile | None:
        return self.graph.profile(user)

    def degree(self, user: int) -> int:
        return self.graph.degree(user)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[TwoTowerResult, Path, list[tuple[int, int, int]],
                                                               dict[int, Profile], np.ndarray]:
    root = tmp_path_factory.mktemp("two_tower")
    connections, profiles, community = planted_partition()
    sage_dir = save_sage(root / "sage")
    result = train_two_tower(connections, profiles, sage_dir, root / "towers", small_config())
    return result, sage_dir, connections, profiles, community


# ---- towers -------------------------------------------------------------------------------------------------------
def test_towers_map_176_inputs_to_unit_64_vectors() -> None:
    torch.manual_seed(0)
    model = TwoTowerModel()
    inputs = np.random.default_rng(0).normal(size=(50, INPUT_DIM)).astype(np.float32)
    for vectors in (model.query_vectors(inputs), model.candidate_vectors(inputs)):
        assert vectors.shape == (50, 64) and vectors.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(model.query_vectors(inputs), model.candidate_vectors(inputs))  # separate weights


def test_eval_mode_batchnorm_is_deterministic_and_batch_independent() -> None:
    torch.manual_seed(0)
    model = TwoTowerModel()
    rng = np.random.default_rng(1)
    model.train()
    for _ in range(3):  # move the running statistics away from their initial values
        model.query(torch.from_numpy(rng.normal(2.0, 3.0, size=(64, INPUT_DIM)).astype(np.float32)))
    inputs = rng.normal(size=(100, INPUT_DIM)).astype(np.float32)
    first = model.query_vectors(inputs)
    np.testing.assert_array_equal(first, model.query_vectors(inputs))
    np.testing.assert_allclose(model.query_vectors(inputs[7:8])[0], first[7], atol=1e-6)  # alone = in a batch
    np.testing.assert_allclose(model.query_vectors(inputs[:40]), first[:40], atol=1e-6)
    assert not model.training  # the vector helpers leave the model in eval mode


def test_tower_config_validates() -> None:
    with pytest.raises(ValueError):
        TowerConfig(hidden_dims=(256,))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        TwoTowerConfig(loss="B4")  # type: ignore[arg-type]


# ---- losses -------------------------------------------------------------------------------------------------------
def test_in_batch_softmax_equals_a_hand_computation() -> None:
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    candidates = torch.tensor([[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]])
    scale = 2.0
    dots = [[sum(q * c for q, c in zip(qr, cr, strict=True)) for cr in candidates.tolist()]
            for qr in query.tolist()]
    expected = sum(-scale * dots[i][i] + math.log(sum(math.exp(scale * d) for d in dots[i]))
                   for i in range(3)) / 3
    assert float(in_batch_softmax_loss(query, candidates, scale)) == pytest.approx(expected, rel=1e-6)
    # A masked column leaves the denominator.
    invalid = torch.zeros(3, 3, dtype=torch.bool)
    invalid[0, 2] = True
    masked = (sum(-scale * dots[i][i] + math.log(sum(math.exp(scale * d) for j, d in enumerate(dots[i])
                                                     if not (i == 0 and j == 2))) for i in range(3)) / 3)
    assert float(in_batch_softmax_loss(query, candidates, scale, invalid)) == pytest.approx(masked, rel=1e-6)
    # Hard-negative weighting: each row's top-1 negative counts hard_weight times in the denominator.
    top = [max((d, j) for j, d in enumerate(dots[i]) if j != i)[1] for i in range(3)]
    weighted = sum(-scale * dots[i][i] + math.log(sum((3.0 if j == top[i] else 1.0) * math.exp(scale * d)
                                                      for j, d in enumerate(dots[i]))) for i in range(3)) / 3
    loss = in_batch_softmax_loss(query, candidates, scale, hard_negatives=1, hard_weight=3.0)
    assert float(loss) == pytest.approx(weighted, rel=1e-6)
    # logQ correction: column j's logit minus log q_j.
    log_q = [0.0, math.log(2.0), math.log(0.5)]
    corrected = sum(-(scale * dots[i][i] - log_q[i]) + math.log(sum(math.exp(scale * d - log_q[j])
                                                                    for j, d in enumerate(dots[i])))
                    for i in range(3)) / 3
    loss = in_batch_softmax_loss(query, candidates, scale, log_q=torch.tensor(log_q))
    assert float(loss) == pytest.approx(corrected, rel=1e-6)


def test_binary_loss_equals_a_hand_computation() -> None:
    def softplus(x: float) -> float:
        return math.log1p(math.exp(x))

    positive, negative = torch.tensor([0.5, 0.9]), torch.tensor([-0.2, 0.4])
    scale, bias = 2.0, 0.1
    expected = 0.5 * ((softplus(-(2 * 0.5 + 0.1)) + softplus(-(2 * 0.9 + 0.1))) / 2
                      + (softplus(2 * -0.2 + 0.1) + softplus(2 * 0.4 + 0.1)) / 2)
    assert float(binary_loss(positive, negative, scale, bias)) == pytest.approx(expected, rel=1e-6)
    only_first = 0.5 * ((softplus(-(2 * 0.5 + 0.1)) + softplus(-(2 * 0.9 + 0.1))) / 2 + softplus(2 * -0.2 + 0.1))
    loss = binary_loss(positive, negative, scale, bias, torch.tensor([True, False]))
    assert float(loss) == pytest.approx(only_first, rel=1e-6)


def test_triplet_loss_and_hard_negative_mining() -> None:
    positive, negative = torch.tensor([0.9, 0.1, 0.5]), torch.tensor([0.2, 0.3, 0.1])
    # hinges: max(0, .2-.9+.2)=0, max(0, .2-.1+.3)=.4, max(0, .2-.5+.1)=0
    assert float(triplet_loss(positive, negative, 0.2)) == pytest.approx(0.4 / 3, rel=1e-6)
    assert float(triplet_loss(positive, negative, 0.2, torch.tensor([False, True, False]))) == pytest.approx(0.4)
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.7], [0.5, 0.2, 0.6, 0.9], [0.3, 0.4, 0.0, 0.1]])
    invalid = torch.zeros(3, 4, dtype=torch.bool)
    invalid[1, 3] = True  # a known edge of row 1: never its negative
    invalid[2] = True  # row 2 has no valid negative
    invalid[2, 2] = False
    chosen, valid = hardest_negatives(scores, invalid)
    assert chosen[:2].tolist() == [1, 2] and valid.tolist() == [True, True, False]


def test_platt_fit_recovers_a_logistic_link() -> None:
    rng = np.random.default_rng(0)
    scores = rng.uniform(-1, 1, 20_000)
    labels = rng.random(20_000) < 1 / (1 + np.exp(-(6.0 * scores - 1.0)))
    a, b = fit_platt(scores, labels)
    assert a == pytest.approx(6.0, abs=0.3) and b == pytest.approx(-1.0, abs=0.1)


# ---- training -----------------------------------------------------------------------------------------------------
def test_training_ranks_true_neighbours_above_random_users(trained: tuple) -> None:
    result, sage_dir, connections, profiles, community = trained
    assert result.metadata["best_val_auc"] > 0.7
    # Independently: future edges vs random pairs, scored through the serving path on the training graph.
    train_end = result.metadata["train_end_ts"]
    graph = AdjacencyGraph(((u, v) for u, v, ts in connections if ts <= train_end), profiles)
    from pymk.index.sage import load_model

    sage, _ = load_model(sage_dir)
    users = sorted(profiles)
    vectors = Embedder(sage, graph, graph).embed(users, salt_for_version(str(sage.version)))
    source = TableSource(graph, dict(zip(users, vectors, strict=True)))
    ranker = TwoTowerRanker(result.model)
    future = [(u, v) for u, v, ts in connections if ts > train_end]
    rng = np.random.default_rng(5)
    random_pairs = [(int(u), int(v)) for u, v in rng.integers(0, len(users), size=(len(future), 2)) if u != v]
    positive = np.array([ranker.score(u, [v], source)[0] for u, v in future])
    negative = np.array([ranker.score(u, [v], source)[0] for u, v in random_pairs])
    assert roc_auc_of(positive, negative) > 0.7
    # score() is the dot of the two towers' vectors, in the candidates' order.
    some = users[:10]
    expected = result.model.candidate_vectors(tower_inputs(some, source)) @ ranker.query_vector(users[0], source)
    np.testing.assert_allclose(ranker.score(users[0], some, source), expected, rtol=1e-6)
    assert ranker.probability(users[0], some, source).min() > 0.0


def test_training_writes_metadata_curve_and_a_version(trained: tuple) -> None:
    result = trained[0]
    assert re.fullmatch(r"tt-\d{14}-[0-9a-f]{8}", result.model.version)
    assert result.model_dir.name == result.model.version and result.curve_png.stat().st_size > 0
    meta = json.loads((result.model_dir / "metadata.json").read_text())
    assert meta["loss"] == "B2" and meta["sage_version"].startswith("sage-")
    assert meta["hyper_parameters"]["batch_size"] == 256 and meta["hyper_parameters"]["lr"] == 1e-3
    assert 0.0 <= meta["best_val_auc"] <= 1.0 and len(meta["history"]) == meta["epochs_run"]
    assert meta["train_end_ts"] < meta["val_start_ts"]
    assert [h["phase"] for h in meta["history"]] == sorted(h["phase"] for h in meta["history"])


def test_save_load_roundtrip_keeps_outputs_and_version(trained: tuple, tmp_path: Path) -> None:
    result = trained[0]
    loaded, meta = load_two_tower(result.model_dir)
    assert loaded.version == result.model.version == meta["version"]
    assert loaded.calibration == pytest.approx(result.model.calibration)
    inputs = np.random.default_rng(3).normal(size=(40, INPUT_DIM)).astype(np.float32)
    np.testing.assert_array_equal(loaded.query_vectors(inputs), result.model.query_vectors(inputs))
    np.testing.assert_array_equal(loaded.candidate_vectors(inputs), result.model.candidate_vectors(inputs))
    # Saving again keeps the version; tampered weights are refused.
    again = save_two_tower(loaded, tmp_path / "copy")
    assert again["version"] == result.model.version
    state = torch.load(tmp_path / "copy" / "model.pt", weights_only=True)
    state["state_dict"]["query.layers.0.bias"] += 1.0
    torch.save(state, tmp_path / "copy" / "model.pt")
    with pytest.raises(ValueError):
        load_two_tower(tmp_path / "copy")


def test_b1_and_b3_train_too(tmp_path: Path) -> None:
    connections, profiles, _ = planted_partition(seed=1)
    sage_dir = save_sage(tmp_path / "sage")
    for loss in ("B1", "B3"):
        result = train_two_tower(connections, profiles, sage_dir, tmp_path / loss,
                                 small_config(loss=loss, epochs=3))
        assert result.metadata["loss"] == loss and result.metadata["best_val_auc"] > 0.7


def test_training_twice_with_one_seed_gives_the_same_towers(tmp_path: Path) -> None:
    """Issue 20: retraining on the same data must not move the evaluation (seeded, deterministic kernels)."""
    connections, profiles, _ = planted_partition(seed=2)
    sage_dir = save_sage(tmp_path / "sage")
    runs = [train_two_tower(connections, profiles, sage_dir, tmp_path / name, small_config(epochs=2))
            for name in ("a", "b")]
    first, second = (run.model.state_dict() for run in runs)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert [h["loss"] for h in runs[0].history] == [h["loss"] for h in runs[1].history]


def test_random_split_trains_on_held_out_folds(tmp_path: Path) -> None:
    connections, profiles, _ = planted_partition(seed=2)
    result = train_two_tower(connections, profiles, save_sage(tmp_path / "sage", None), tmp_path / "towers",
                             small_config(split="random", epochs=3))
    meta = result.metadata
    assert meta["split"] == "random" and len(meta["snapshots"]) == 5
    assert sum(s["positives"] for s in meta["snapshots"]) == meta["train_edges"]
    assert all(s["graph_edges"] + s["positives"] == meta["train_edges"] for s in meta["snapshots"])


# ---- leakage guards -----------------------------------------------------------------------------------------------
def test_sage_trained_into_the_validation_period_is_refused(tmp_path: Path) -> None:
    connections, profiles, _ = planted_partition()
    late = save_sage(tmp_path / "late", train_end_ts=10**9)  # saw every connection
    with pytest.raises(LeakageError):
        train_two_tower(connections, profiles, late, tmp_path / "out", small_config())
    unknown = save_sage(tmp_path / "unknown", train_end_ts=None)
    with pytest.raises(LeakageError):
        train_two_tower(connections, profiles, unknown, tmp_path / "out", small_config())
    check_sage_before({"train_end_ts": 99}, 100)
    with pytest.raises(LeakageError):
        check_sage_before({"train_end_ts": 100}, 100)
    assert not (tmp_path / "out").exists()


# ---- inputs and blend ---------------------------------------------------------------------------------------------
def test_tower_inputs_layout() -> None:
    profile = Profile(company="Acme", school="MIT", industry="software", title="data engineer",
                      skills=("python", "sql"), geo=(48.85, 2.35))
    graph = AdjacencyGraph([(1, 2), (1, 3), (1, 4)], {1: profile})
    vector = np.full(128, 0.5, np.float32)
    inputs = tower_inputs([1, 2, 9], TableSource(graph, {1: vector}))
    assert inputs.shape == (3, 176) and inputs.dtype == np.float32
    np.testing.assert_array_equal(inputs[0, :128], vector)
    np.testing.assert_array_equal(inputs[1:, :128], 0.0)  # no embedding: zeros
    np.testing.assert_array_equal(inputs[0, 128:160], encode_profile_compact(profile))
    np.testing.assert_array_equal(inputs[:, 160:170], encode_degrees(np.array([3, 1, 0])))
    np.testing.assert_array_equal(inputs[0, 170:], profile_flags(profile))
    np.testing.assert_array_equal(inputs[2, 128:], np.concatenate([np.zeros(32), encode_degrees(np.array([0]))[0],
                                                                   np.zeros(6)]))


def test_blend_scores() -> None:
    xgb = np.array([0.9, 0.1, 0.5, 0.3])
    towers = np.array([-0.2, 0.8, 0.1, 0.4])
    assert np.argsort(-blend_scores(xgb, towers, 0.0)).tolist() == np.argsort(-xgb).tolist()
    assert np.argsort(-blend_scores(xgb, towers, 1.0)).tolist() == np.argsort(-towers).tolist()
    half = blend_scores(xgb, towers, 0.5)
    np.testing.assert_allclose(half, 0.5 * np.array([1.0, 0.0, 2 / 3, 1 / 3]) + 0.5 * np.array([0.0, 1.0, 1 / 3,
                                                                                                 2 / 3]))
    np.testing.assert_allclose(blend_scores(np.array([0.5, 0.5]), np.array([1.0, 2.0]), 0.0), [0.5, 0.5])  # ties
    p_xgb, p_tt = np.array([0.8, 0.2]), np.array([0.5, 0.9])
    logit = blend_scores(p_xgb, p_tt, 0.25, method="logit")
    np.testing.assert_allclose(logit, 0.75 * np.log(p_xgb / (1 - p_xgb)) + 0.25 * np.log(p_tt / (1 - p_tt)))
    with pytest.raises(ValueError):
        blend_scores(xgb, towers[:2], 0.5)
