"""GraphSAGE user embeddings at stream time: node features, deterministic sampling, the model, the embedder,
saving and loading. Tiny graphs and untrained models: the behaviour checked here does not need training."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import OrderedDict
from collections.abc import Collection, Hashable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from pymk.events import Profile
from pymk.index.embedder import Embedder, salt_for_version
from pymk.index.memory_graph import AdjacencyGraph
from pymk.index.node_features import (
    ACTIVITY_FEATURE_DIM,
    NODE_FEATURE_DIM,
    PROFILE_FEATURE_DIM,
    encode_activity,
    encode_node,
    encode_profile_compact,
)
from pymk.index.sage import GraphSage, SageConfig, load_model, save_model
from pymk.index.sampling import fetch_from_source, sample_neighbours, sample_subgraph

torch.set_num_threads(1)

ALICE = Profile(company="Acme Corp", school="MIT", industry="software", title="Senior Software Engineer",
                skills=("python", "go", "kafka"), geo=(42.36, -71.06))
BOB = Profile(company="Globex", school="Stanford", industry="finance", title="risk analyst",
              skills=("valuation",), geo=(51.51, -0.13))


def random_graph(n: int, p: float, seed: int) -> AdjacencyGraph:
    rng = np.random.default_rng(seed)
    edges = [(u, v) for u in range(n) for v in range(u + 1, n) if rng.random() < p]
    profiles = {u: Profile(company=f"company {u % 5}", school=f"school {u % 3}", title="engineer",
                           skills=(f"skill {u % 7}",)) for u in range(0, n, 2)}  # odd users: no profile
    return AdjacencyGraph(edges, profiles)


@pytest.fixture(scope="module")
def model() -> GraphSage:
    torch.manual_seed(0)
    return GraphSage(SageConfig(input_dim=NODE_FEATURE_DIM)).eval()


@pytest.fixture(scope="module")
def graph() -> AdjacencyGraph:
    return random_graph(300, 0.05, seed=1)


# ---- node features ----------------------------------------------------------------------------------------------
def test_feature_sizes_and_types() -> None:
    for vector, size in ((encode_node(ALICE, 12), NODE_FEATURE_DIM), (encode_node(None, 0), NODE_FEATURE_DIM),
                         (encode_profile_compact(ALICE), PROFILE_FEATURE_DIM),
                         (encode_profile_compact(None), PROFILE_FEATURE_DIM),
                         (encode_activity(3, signed_up=True), ACTIVITY_FEATURE_DIM)):
        assert vector.shape == (size,) and vector.dtype == np.float32 and np.isfinite(vector).all()
    assert NODE_FEATURE_DIM == 256 and PROFILE_FEATURE_DIM == 32 and ACTIVITY_FEATURE_DIM == 16
    assert not encode_profile_compact(None).any()
    assert encode_profile_compact(ALICE).any()


def test_features_follow_normalised_text_and_tell_profiles_apart() -> None:
    shouty = Profile(company="  ACME   corp ", school="mit", industry="Software", title="senior software engineer",
                     skills=("Kafka", "GO", "python"), geo=(42.36, -71.06))
    assert np.array_equal(encode_node(ALICE, 5), encode_node(shouty, 5))
    assert not np.array_equal(encode_node(ALICE, 5), encode_node(BOB, 5))
    assert not np.array_equal(encode_node(ALICE, 5), encode_node(ALICE, 50))  # degree is a feature


def test_activity_features_reflect_degree_and_completeness() -> None:
    degrees = [encode_activity(d) for d in (0, 1, 5, 200)]
    assert all(not np.array_equal(a, b) for a, b in zip(degrees, degrees[1:], strict=False))
    assert encode_activity(0)[0] == 0.0 < encode_activity(10)[0] < encode_activity(1000)[0]
    no_profile, signed_up = encode_activity(3), encode_activity(3, signed_up=True)
    full = encode_activity(3, profile=ALICE)
    assert no_profile[10] == 0.0 and signed_up[10] == 1.0 and full[10] == 1.0
    assert full[11] == 1.0  # every field given


def test_node_features_are_stable_across_processes() -> None:
    """Python's str hash is salted per process; the feature hashing must not be."""
    code = ("import sys; from pymk.events import Profile; from pymk.index.node_features import encode_node; "
            "p = Profile(company='Acme Corp', school='MIT', industry='software', title='Senior Software Engineer', "
            "skills=('python', 'go', 'kafka'), geo=(42.36, -71.06)); "
            "sys.stdout.write(encode_node(p, 12).tobytes().hex())")
    outputs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout for seed in (1, 2)}
    assert outputs == {encode_node(ALICE, 12).tobytes().hex()}


# ---- sampling ------------------------------------------------------------------------------------------------------
def test_sample_neighbours_is_a_bounded_deterministic_subset() -> None:
    neighbours = list(range(100, 150))
    sample = sample_neighbours(7, neighbours, fanout=10, salt=3)
    assert len(sample) == 10 and len(set(sample)) == 10 and set(sample) <= set(neighbours)
    assert sample_neighbours(7, list(reversed(neighbours)), fanout=10, salt=3) == sample  # order-free
    assert sample_neighbours(7, set(neighbours), fanout=10, salt=3) == sample
    assert sample_neighbours(7, neighbours, fanout=10, salt=4) != sample
    assert sorted(sample_neighbours(7, [1, 2, 3], fanout=10)) == [1, 2, 3]  # fewer than fanout: all
    assert sample_neighbours(7, [], fanout=10) == []
    assert sample_neighbours(7, neighbours, fanout=25, salt=3)[:10] == sample  # a prefix of a larger sample


def test_sample_neighbours_is_uniform() -> None:
    neighbours = list(range(20))
    counts = np.zeros(20)
    for salt in range(2000):
        counts[sample_neighbours(1, neighbours, fanout=5, salt=salt)] += 1
    expected = 2000 * 5 / 20  # 500 each; binomial sd ~19
    assert np.abs(counts - expected).max() < 100


def test_subgraph_holds_only_sampled_real_neighbours(graph: AdjacencyGraph) -> None:
    roots = np.array([0, 5, 9, 42], dtype=np.int64)
    subgraph = sample_subgraph(roots, fetch_from_source(graph), (10, 10), salt=11)
    assert list(subgraph.node_ids[:4]) == list(roots)
    assert subgraph.num_nodes <= len(roots) * (1 + 10 + 100)
    assert len(set(subgraph.node_ids.tolist())) == subgraph.num_nodes
    for row in range(subgraph.neighbour_index.shape[0]):
        count = subgraph.neighbour_count[row]
        owner = int(subgraph.node_ids[row])
        sampled = subgraph.node_ids[subgraph.neighbour_index[row, :count]].tolist()
        assert count <= 10 and count == min(10, graph.degree(owner))
        assert all(graph.has_edge(owner, v) for v in sampled)
        assert (subgraph.neighbour_index[row, count:] == -1).all()


# ---- the model and the embedder -----------------------------------------------------------------------------------
def test_embeddings_have_shape_and_unit_norm(model: GraphSage, graph: AdjacencyGraph) -> None:
    users = list(range(0, 300, 3))
    vectors = Embedder(model, graph, graph).embed(users, salt=0)
    assert vectors.shape == (len(users), 128) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_cold_start_users_get_profile_embeddings(model: GraphSage, graph: AdjacencyGraph) -> None:
    graph = AdjacencyGraph(graph.edges(), {1000: ALICE, 1001: ALICE, 1002: BOB})  # 1000..1003: no edges
    vectors = Embedder(model, graph, graph).embed([1000, 1001, 1002, 1003], salt=0)
    assert np.isfinite(vectors).all() and (np.abs(vectors[0]) > 0).any()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(vectors[0], vectors[1])  # same profile and degree, no neighbours
    assert not np.allclose(vectors[0], vectors[2])  # different profiles
    assert not np.allclose(vectors[0], vectors[3])  # profile vs. none


def test_embedder_features_match_encode_node(model: GraphSage, graph: AdjacencyGraph) -> None:
    nodes = np.arange(0, 60, dtype=np.int64)
    features = Embedder(model, graph, graph).node_features(nodes)
    expected = np.stack([encode_node(graph.profile(u), graph.degree(u)) for u in nodes.tolist()])
    assert np.array_equal(features, expected)


def test_embedders_sharing_a_cache_encode_each_profile_once(model: GraphSage, graph: AdjacencyGraph) -> None:
    """A worker's partitions share one profile-encoding LRU: the second embedder hits what the first encoded,
    with the same vectors as an embedder with a cache of its own."""
    shared: OrderedDict[Hashable, np.ndarray] = OrderedDict()
    nodes = np.arange(0, 60, dtype=np.int64)
    first, second = Embedder(model, graph, graph, cache=shared), Embedder(model, graph, graph, cache=shared)
    first.node_features(nodes)
    entries = len(shared)
    assert entries > 0 and first.cache_misses == entries
    assert np.array_equal(second.node_features(nodes), Embedder(model, graph, graph).node_features(nodes))
    assert second.cache_misses == 0 and len(shared) == entries
    assert second.embed([3, 17], salt=5).tobytes() == Embedder(model, graph, graph).embed([3, 17], salt=5).tobytes()


class ShuffledNeighbours:
    """The same graph, neighbour lists in another order (as another store might return them)."""

    def __init__(self, graph: AdjacencyGraph) -> None:
        self.graph = graph

    def neighbours(self, user: int) -> Collection[int]:
        return sorted(self.graph.neighbours(user), reverse=True)


def test_same_graph_and_salt_give_identical_bytes(model: GraphSage, graph: AdjacencyGraph) -> None:
    users = [3, 17, 42, 99, 150, 299]
    reference = Embedder(model, graph, graph).embed(users, salt=123)
    # Again, alone, in another batch, in other order, in small batches, from another store order.
    assert Embedder(model, graph, graph).embed(users, salt=123).tobytes() == reference.tobytes()
    alone = np.stack([Embedder(model, graph, graph).embed([u], salt=123)[0] for u in users])
    assert alone.tobytes() == reference.tobytes()
    crowd = list(range(0, 300, 7)) + users
    assert Embedder(model, graph, graph).embed(crowd, salt=123)[-len(users):].tobytes() == reference.tobytes()
    reverse = Embedder(model, graph, graph, batch_size=2).embed(users[::-1], salt=123)[::-1]
    assert reverse.tobytes() == reference.tobytes()
    shuffled = Embedder(model, graph, ShuffledNeighbours(graph)).embed(users, salt=123)
    assert shuffled.tobytes() == reference.tobytes()
    per_user = Embedder(model, graph, graph).embed(users, salt=[123] * len(users))
    assert per_user.tobytes() == reference.tobytes()
    # Another salt samples other neighbours: high-degree users get other vectors.
    other = Embedder(model, graph, graph).embed(users, salt=124)
    assert not np.array_equal(other, reference)


def test_graph_changes_change_the_embedding(model: GraphSage, graph: AdjacencyGraph) -> None:
    graph = AdjacencyGraph(list(graph.edges()))  # a copy to change
    before = Embedder(model, graph, graph).embed([4], salt=0)
    graph.add_edge(4, 250)
    assert not np.array_equal(Embedder(model, graph, graph).embed([4], salt=0), before)


class VersionedProfiles:
    """A feature source with profile versions (as the worker can offer): the embedder caches by version."""

    def __init__(self, graph: AdjacencyGraph) -> None:
        self.graph = graph
        self.versions: dict[int, int] = {}
        self.profile_reads = 0

    def profile(self, user: int) -> Profile | None:
        self.profile_reads += 1
        return self.graph.profile(user)

    def degree(self, user: int) -> int:
        return self.graph.degree(user)

    def profile_version(self, user: int) -> int:
        return self.versions.get(user, 0)


def test_profile_cache_is_keyed_by_profile_version(model: GraphSage) -> None:
    graph = AdjacencyGraph([(1, 2), (2, 3)], {1: ALICE, 2: BOB, 3: BOB})
    source = VersionedProfiles(graph)
    embedder = Embedder(model, source, graph)
    first = embedder.embed([1, 2], salt=0)
    reads = source.profile_reads
    assert np.array_equal(embedder.embed([1, 2], salt=0), first) and source.profile_reads == reads  # cached
    graph.set_profile(1, BOB)
    source.versions[1] = 1
    changed = embedder.embed([1, 2], salt=0)
    assert source.profile_reads == reads + 1  # only the changed user is read again
    assert not np.array_equal(changed[0], first[0])
    assert np.array_equal(changed, Embedder(model, graph, graph).embed([1, 2], salt=0))


def test_save_load_roundtrip(model: GraphSage, graph: AdjacencyGraph, tmp_path: Path) -> None:
    metadata = save_model(model, tmp_path / "m", {"note": "test"})
    assert metadata["version"].startswith("sage-") and model.version == metadata["version"]
    loaded, loaded_meta = load_model(tmp_path / "m")
    assert loaded.version == model.version == loaded_meta["version"] and loaded_meta["note"] == "test"
    salt = salt_for_version(loaded.version)
    users = list(range(0, 300, 5))
    assert (Embedder(loaded, graph, graph).embed(users, salt).tobytes()
            == Embedder(model, graph, graph).embed(users, salt).tobytes())
    assert Embedder(loaded, graph, graph).version == model.version


def test_load_refuses_mismatched_weights(model: GraphSage, tmp_path: Path) -> None:
    save_model(model, tmp_path / "m")
    other = GraphSage(model.config)
    torch.save({"config": asdict(model.config),
                "state_dict": other.state_dict(), "version": model.version}, tmp_path / "m" / "model.pt")
    with pytest.raises(ValueError, match="weights"):
        load_model(tmp_path / "m")


def test_training_mode_dropout_does_not_leak_into_embedder(graph: AdjacencyGraph) -> None:
    torch.manual_seed(1)
    trainable = GraphSage(SageConfig(input_dim=NODE_FEATURE_DIM)).train()
    first = Embedder(trainable, graph, graph).embed([1, 2, 3], salt=0)
    trainable.train()  # a training loop may switch it back: embed() puts it in eval mode again
    assert np.array_equal(Embedder(trainable, graph, graph).embed([1, 2, 3], salt=0), first)
