"""Training the GraphSAGE user model: time split and leakage guard, mini-batch sampling, loss, AUC, and
end-to-end training on small planted-partition graphs (a few seconds each on one core)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pymk.events import Profile
from pymk.index.embedder import Embedder
from pymk.index.memory_graph import AdjacencyGraph
from pymk.index.node_features import encode_degrees
from pymk.index.sage import GraphSage, SageConfig, load_model
from pymk.index.training import (
    EmbeddingTrainingConfig,
    TrainingGraph,
    assert_no_leakage,
    contrastive_loss,
    split_by_time,
    train_embeddings,
    validation_auc,
)
from pymk.learning import LeakageError, roc_auc_of

torch.set_num_threads(1)


def planted_partition(communities: int, size: int, p_in: float, p_out: float, seed: int
                      ) -> tuple[list[tuple[int, int, int]], np.ndarray]:
    """Connections (u, v, ts) with random times, and each user's community."""
    rng = np.random.default_rng(seed)
    community = np.arange(communities * size) // size
    connections = []
    for u in range(community.shape[0]):
        for v in range(u + 1, community.shape[0]):
            if rng.random() < (p_in if community[u] == community[v] else p_out):
                connections.append((u, v, int(rng.integers(0, 10**9))))
    return connections, community


def small_config(**overrides: object) -> EmbeddingTrainingConfig:
    settings: dict[str, object] = dict(epochs=4, batch_size=128, hidden_dim=64, embedding_dim=32, patience=4,
                                       extra_negatives=64, progress=False)
    settings.update(overrides)
    return EmbeddingTrainingConfig(**settings)  # type: ignore[arg-type]


# ---- split and leakage ----------------------------------------------------------------------------------------
def test_time_split_puts_the_last_tenth_in_validation() -> None:
    connections = [(i, i + 1, 1000 - i) for i in range(100)]  # reverse time order on purpose
    connections += [(0, 1, 5000), (3, 3, 10)]  # a repeated pair and a self-loop: dropped
    train, val = split_by_time(connections, 0.1)
    assert len(train) == 90 and len(val) == 10
    assert max(ts for *_, ts in train) < min(ts for *_, ts in val)
    assert [ts for *_, ts in train + val] == sorted(ts for *_, ts in train + val)


def test_time_split_moves_ties_at_the_cut_into_validation() -> None:
    connections = [(i, i + 1, i) for i in range(85)] + [(i, i + 1, 85) for i in range(100, 115)]
    train, val = split_by_time(connections, 0.1)  # the cut (index 90) falls inside the ts=85 group
    assert len(train) == 85 and all(ts == 85 for *_, ts in val)
    assert_no_leakage(AdjacencyGraph((u, v) for u, v, _ in train), val, train)


def test_leakage_guard_raises_when_a_validation_edge_is_in_the_message_passing_graph() -> None:
    train = [(1, 2, 10), (2, 3, 20)]
    val = [(3, 4, 30), (1, 3, 40)]
    assert_no_leakage(AdjacencyGraph((u, v) for u, v, _ in train), val, train)  # clean: no error
    leaky = AdjacencyGraph([(1, 2), (2, 3), (4, 3)])  # (3, 4) leaked, in the other orientation
    with pytest.raises(LeakageError, match=r"\(3, 4\)"):
        assert_no_leakage(leaky, val)
    with pytest.raises(LeakageError, match="not before"):  # an edge from the validation period, by time
        assert_no_leakage(AdjacencyGraph([(1, 2), (2, 3), (5, 6)]), val, train + [(5, 6, 35)])


def test_validation_auc_refuses_a_leaky_graph() -> None:
    connections, _ = planted_partition(2, 10, 0.5, 0.1, seed=0)
    model = untrained_model()
    graph = AdjacencyGraph((u, v) for u, v, _ in connections)
    u, v, _ = connections[0]
    with pytest.raises(LeakageError):
        validation_auc(model, graph, graph, [(u, v)], [(u, (v + 1) % 20)])


def untrained_model() -> GraphSage:
    torch.manual_seed(0)
    return GraphSage(SageConfig(hidden_dim=16, embedding_dim=8))


# ---- AUC and loss ------------------------------------------------------------------------------------------------
def test_roc_auc_of_two_samples_matches_pairwise_counting() -> None:
    rng = np.random.default_rng(0)
    positive, negative = rng.integers(0, 5, 40).astype(float), rng.integers(0, 5, 30).astype(float)  # many ties
    pairwise = np.mean([(p > n) + 0.5 * (p == n) for p in positive for n in negative])
    assert roc_auc_of(positive, negative) == pytest.approx(pairwise)
    assert roc_auc_of(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert roc_auc_of(np.array([1.0]), np.array([1.0])) == 0.5


def test_contrastive_loss_is_cross_entropy_on_the_diagonal() -> None:
    torch.manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
    b = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
    invalid = torch.zeros(6, 6, dtype=torch.bool)
    expected = torch.nn.functional.cross_entropy(a @ b.T / 0.1, torch.arange(6))
    assert contrastive_loss(a, b, invalid, 0.1).item() == pytest.approx(expected.item(), rel=1e-6)
    masked = invalid.clone()
    masked[0, 1] = True  # a known edge among the negatives of row 0 no longer counts
    assert contrastive_loss(a, b, masked, 0.1).item() < expected.item()
    assert contrastive_loss(a, b, invalid, 0.1, hard_negatives=2, hard_weight=3.0).item() > expected.item()
    assert contrastive_loss(b, b, invalid, 0.1).item() < contrastive_loss(a, b, invalid, 0.1).item()


# ---- mini-batches ---------------------------------------------------------------------------------------------------
def test_training_batch_holds_only_the_sampled_subgraph() -> None:
    connections, _ = planted_partition(20, 100, 0.05, 0.001, seed=1)  # 2,000 users, ~7k edges
    graph = TrainingGraph(connections, None, fanout=(10, 10), identity_dim=16)
    rng = np.random.default_rng(0)
    picked = rng.choice(graph.src.shape[0], 8, replace=False)
    a, b = graph.src[picked], graph.dst[picked]
    negatives = rng.integers(0, graph.size, 4)
    sampled = graph.sample_batch(a, b, negatives, salt=5)
    roots = np.unique(np.concatenate([a, b, negatives])).shape[0]
    batch = sampled.batch
    assert batch.hop_offsets[1] == roots
    assert batch.num_nodes <= roots * (1 + 10 + 100)
    assert batch.num_nodes < graph.size  # never the whole graph
    assert batch.features.shape == (batch.num_nodes, 256) and batch.identity.shape == (batch.num_nodes, 16)
    assert batch.neighbour_index.shape[0] == batch.hop_offsets[2]
    assert int(batch.neighbour_index.max()) < batch.num_nodes
    # The positive pairs are hidden: b_i is never a sampled neighbour of a_i (it will not be at validation).
    for row_a, row_b in zip(sampled.a_rows.tolist(), sampled.b_rows.tolist(), strict=True):
        assert row_b not in batch.neighbour_index[row_a].tolist()
        assert row_a not in batch.neighbour_index[row_b].tolist()
    # ... and so are they in the degree features: degree drops by the hidden edges.
    full_degree = graph.degree[a[0]]
    hidden = int(np.sum((a == a[0]) | (b == a[0])))
    expected = encode_degrees(np.array([full_degree - hidden]))[0]
    assert np.array_equal(batch.features[sampled.a_rows[0], 240:250].numpy(), expected)


# ---- end to end ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, list[tuple[int, int, int]], dict[int, Profile]]:
    connections, community = planted_partition(8, 40, 0.25, 0.01, seed=0)
    profiles = {u: Profile(company=f"company {c}", title="engineer") for u, c in enumerate(community.tolist())}
    result = train_embeddings(connections, profiles, tmp_path_factory.mktemp("models"), small_config())
    return result, connections, profiles


def test_training_learns_community_structure(trained: tuple) -> None:
    result, connections, profiles = trained
    # Perfect community knowledge gives ~0.83 here (22% of edges cross communities); random is 0.5.
    assert result.metadata["best_val_auc"] >= 0.75
    # True future neighbours rank above random users, on the pre-validation graph only.
    train, val = split_by_time(connections, 0.1)
    graph = AdjacencyGraph(((u, v) for u, v, _ in train), profiles)
    vectors = Embedder(result.model, graph, graph).embed(np.arange(320), salt=0)
    rng = np.random.default_rng(3)
    wins = []
    for u, v, _ in val:
        others = rng.integers(0, 320, 20)
        wins.append(np.mean(vectors[u] @ vectors[v] > vectors[others] @ vectors[u]))
    assert np.mean(wins) >= 0.7


def test_training_writes_model_metadata_and_curve(trained: tuple) -> None:
    result, _, _ = trained
    assert result.model_dir.name == result.model.version and result.model.version.startswith("sage-")
    metadata = json.loads((result.model_dir / "metadata.json").read_text())
    for key in ("version", "hyper_parameters", "feature_config", "train_edges", "val_edges", "best_val_auc",
                "epochs_run", "best_epoch", "wall_seconds", "history"):
        assert key in metadata, key
    assert metadata["version"] == result.model.version and metadata["hyper_parameters"]["lr"] == 1e-3
    assert metadata["train_edges"] + metadata["val_edges"] == len(trained[1])
    assert len(result.history) == metadata["epochs_run"] and all("val_auc" in h for h in result.history)
    assert result.curve_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    loaded, loaded_meta = load_model(result.model_dir)
    assert loaded.version == result.model.version and loaded_meta["best_val_auc"] == metadata["best_val_auc"]


def test_curriculum_walks_through_three_phases() -> None:
    config = EmbeddingTrainingConfig(epochs=9)
    assert [config.phase(epoch) for epoch in range(9)] == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_structure_alone_is_learnt_through_the_neighbour_sketch(tmp_path: Path) -> None:
    """Without profiles every user has the same kind of features; the neighbour identity sketch is what lets
    the model find communities (without it this graph stays at AUC ~0.5)."""
    connections, _ = planted_partition(8, 40, 0.25, 0.01, seed=0)
    result = train_embeddings(connections, None, tmp_path, small_config(epochs=6, patience=6))
    assert result.metadata["best_val_auc"] >= 0.65
    # The curriculum ran all three phases (no early stop), and the best weights were kept.
    assert [h["phase"] for h in result.history] == [0, 0, 1, 1, 2, 2]
    assert result.metadata["best_val_auc"] == max(h["val_auc"] for h in result.history)
