"""One contract, two implementations: the in-memory source (training replays, evaluation) and the worker's
source (RocksDB rows, mirrors, user-globals, the global index) answer every :class:`RankingSource` read the same
way after the same events, and so build the same feature matrix: what is evaluated offline is what is served.

The worker side is the worker's own state without Kafka (``pymk.bench.worker_list.build_world``: partition states
that exchange their messages in process); the worker owns partition 0, and the other partition's users are read
through user-globals, as a worker reads users it does not own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pymk.bench.worker_list import WorkerWorld, build_world
from pymk.ranking.candidates import CandidateConfig, generate_candidates
from pymk.ranking.features import FEATURE_NAMES, FeatureBuilder
from pymk.ranking.memory_source import MemorySource
from pymk.settings import Settings
from pymk.streams.producer import synthetic_events
from pymk.streams.ranking_source import WorkerRankingSource

USERS = 400
SEED = 5


@pytest.fixture(scope="module", params=["no hubs", "hubs"])
def sources(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
            ) -> tuple[WorkerWorld, WorkerRankingSource, MemorySource]:
    """Both sides after the same events; with ``hubs`` both under the same hub degree (PYMK_HUB_DEGREE: the users
    above the 80th percentile of degrees are hubs, and no 2-path runs through them on either side)."""
    memory = MemorySource()
    memory.apply_all(synthetic_events(USERS, seed=SEED))
    hub_degree = 0
    if request.param == "hubs":
        uncapped = memory
        hub_degree = int(np.percentile([uncapped.degree(u) for u in uncapped.users()], 80))
        memory = MemorySource(hub_degree=hub_degree)
        memory.apply_all(synthetic_events(USERS, seed=SEED))
        assert 0 < sum(memory.is_hub(u) for u in memory.users()) < USERS // 4
        assert any(memory.two_hop(u)[0] != uncapped.two_hop(u)[0] for u in memory.users())  # the cap bites
    home = Path(tmp_path_factory.mktemp("contract"))
    settings = Settings(home=home / "home", common_counts="on-read", hub_degree=hub_degree) if hub_degree else None
    world = build_world(home, USERS, partitions=2, seed=SEED, settings=settings)
    memory.set_embeddings({u: world.index.vector(u) for u in world.index.users()})
    refresher = world.refresher()
    worker = WorkerRankingSource(world.owned, world.index, world.degree_of, world.profile_of, world.globals.activity,
                                 world.globals.most_active, facts=refresher.facts)
    return world, worker, memory


def local_users(world: WorkerWorld) -> list[int]:
    users = sorted(world.owned.graph.local_users())
    assert len(users) > 50
    return users


def test_graph_reads_agree(sources: tuple[WorkerWorld, WorkerRankingSource, MemorySource]) -> None:
    world, worker, memory = sources
    for user in local_users(world):
        assert set(worker.neighbours(user)) == set(memory.neighbours(user)), user
        w_counts, w_aa = worker.two_hop(user)
        m_counts, m_aa = memory.two_hop(user)
        assert dict(w_counts) == dict(m_counts), user
        assert w_aa.keys() == m_aa.keys()
        for other, score in w_aa.items():
            assert score == pytest.approx(m_aa[other], rel=1e-12, abs=1e-15), (user, other)
        w_ra, m_ra = worker.two_hop_resource_allocation(user), memory.two_hop_resource_allocation(user)
        assert w_ra.keys() == m_ra.keys()
        for other, score in w_ra.items():
            assert score == pytest.approx(m_ra[other], rel=1e-12, abs=1e-15), (user, other)
        assert worker.degree(user) == memory.degree(user)
        for other in list(w_counts)[:20]:
            assert worker.degree(other) == memory.degree(other), other
            assert sorted(worker.common_neighbors(user, other)) == sorted(memory.common_neighbors(user, other))


def test_behaviour_profile_and_activity_reads_agree(
        sources: tuple[WorkerWorld, WorkerRankingSource, MemorySource]) -> None:
    world, worker, memory = sources
    as_of = world.event_time_ms
    for user in local_users(world):
        assert dict(worker.profile_views(user)) == dict(memory.profile_views(user)), user
        assert dict(worker.co_engaged_counts(user)) == dict(memory.co_engaged_counts(user)), user
        assert dict(worker.dismissed(user)) == dict(memory.dismissed(user)), user
        assert worker.profile(user) == memory.profile(user), user
        assert worker.last_connection_ts(user) == memory.last_connection_ts(user), user
        assert tuple(worker.connection_activity(user, as_of)) == tuple(memory.connection_activity(user, as_of)), user


def test_feature_matrices_agree(sources: tuple[WorkerWorld, WorkerRankingSource, MemorySource]) -> None:
    world, worker, memory = sources
    as_of = world.event_time_ms
    config = CandidateConfig(ann_k=0)  # the two sources' ANN are different indexes; the rest is the contract
    compared = 0
    for user in local_users(world)[:80]:
        candidates = generate_candidates(user, worker, config, as_of)
        if not len(candidates):
            continue
        # each source with a builder of its own: the profile caches must not carry one's reads to the other
        got = FeatureBuilder().matrix(user, candidates, worker, as_of)
        want = FeatureBuilder().matrix(user, candidates, memory, as_of)
        for column, name in enumerate(FEATURE_NAMES):
            # vectors are float32: the in-memory source normalises what it is given once more, which moves the
            # last bits of a cosine (~1e-8); every other feature is the same to the last bit or nearly
            tolerance = 1e-6 if name == "gnn_embedding_cosine_sim" else 1e-12
            np.testing.assert_allclose(got[:, column], want[:, column], rtol=tolerance, atol=tolerance,
                                       equal_nan=True, err_msg=f"user {user}, {name}")
        compared += len(candidates)
    assert compared > 1000


def test_ego_adjacency_agrees(sources: tuple[WorkerWorld, WorkerRankingSource, MemorySource]) -> None:
    """The neighbours' rows behind the structure columns: the same neighbours, degrees and neighbour sets (the
    order inside one neighbour's run is the store's, and the structure columns do not depend on it)."""
    world, worker, memory = sources
    for user in local_users(world):
        got, want = worker.ego_adjacency(user), memory.ego_adjacency(user)
        assert got.middles.tolist() == want.middles.tolist(), user
        assert got.sizes.tolist() == want.sizes.tolist(), user
        starts = np.concatenate([[0], np.cumsum(want.sizes)])
        for i in range(len(want.middles)):
            run = slice(int(starts[i]), int(starts[i + 1]))
            assert sorted(got.others[run].tolist()) == sorted(want.others[run].tolist()), (user, i)
