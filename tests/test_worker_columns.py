"""The worker's columnar reads and array Stage 1 give exactly what the per-user reads and the dict traversal
gave: the two-hop arrays equal the dict traversal bit for bit, Stage 1 over them equals the previous Stage 1
(kept below as the reference), the fact columns equal the per-user reads for local, remote and unknown users,
and the published lists and impressions are the same JSON."""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Sequence
from itertools import repeat

import numpy as np
import pytest

from pymk.bench.worker_list import WorkerWorld, build_world
from pymk.events import Impression, unshown_sample_to_json
from pymk.ranking.candidates import (
    _AA_DECIMALS,
    CandidateConfig,
    CandidateFilter,
    CandidateSet,
    _top_k_graph,
    default_filters,
    generate_candidates,
)
from pymk.ranking.features import FEATURE_NAMES, feature_dict
from pymk.ranking.impressions import feature_dicts
from pymk.ranking.recommend import RankedList, ScoredCandidates
from pymk.ranking.source import IdArraySource, PopularSource, RankingSource, TwoHopArraySource
from pymk.streams.ranking_source import WorkerRankingSource
from pymk.streams.user_facts import UserFacts


# ---- the reference: Stage 1 as it was before the arrays (generate_candidates at 3c36b74) -----------------------
def reference_candidates(user: int, source: RankingSource, config: CandidateConfig, as_of_ms: int,
                        filters: Iterable[CandidateFilter] | None = None) -> CandidateSet:
    """Stage 1 for ``user`` as of ``as_of_ms`` (see the module doc)."""
    filters = tuple(default_filters(config) if filters is None else filters)
    excluded: set[int] = set()
    for candidate_filter in filters:
        excluded.update(candidate_filter.excluded(user, source, as_of_ms))
    excluded_ids = np.fromiter(excluded, np.int64, len(excluded))

    counts_map, scores_map = source.two_hop(user)
    pool = len(counts_map)
    two_hop_ids = np.fromiter(counts_map.keys(), np.int64, pool)
    two_hop_counts = np.fromiter(counts_map.values(), np.int64, pool)
    two_hop_scores = np.fromiter(map(scores_map.__getitem__, counts_map), np.float64, pool)  # the ids' order
    graph_ids = np.empty(0, np.int64)
    graph_counts = np.empty(0, np.int64)
    graph_scores = np.empty(0, np.float64)
    if config.graph_k > 0 and pool:
        allowed = ~np.isin(two_hop_ids, excluded_ids) if len(excluded_ids) else np.ones(pool, bool)
        ids, counts, scores = two_hop_ids[allowed], two_hop_counts[allowed], two_hop_scores[allowed]
        top = _top_k_graph(ids, counts, scores, config.graph_k, source)
        graph_ids, graph_counts, graph_scores = ids[top], counts[top], scores[top]

    ann = list(source.ann_neighbours(user, config.ann_k, excluded)) if config.ann_k > 0 else []
    ann = ann[: config.ann_k]
    popular: list[int] = []
    if config.popular_k > 0 and isinstance(source, PopularSource):
        asked = source.most_active(config.popular_k + len(excluded), as_of_ms)
        popular = [int(u) for u in asked if u not in excluded][: config.popular_k]

    # Merge: graph candidates first (their order), then ANN-only ones. Plain Python values in the loop (a numpy
    # scalar per ANN hit cost more than the rest of the merge).
    position = {u: i for i, u in enumerate(graph_ids.tolist())}
    graph_cos = [math.nan] * len(graph_ids)
    extra_ids: list[int] = []
    extra_cos: list[float] = []
    for other, cosine in ann:
        other = int(other)
        i = position.get(other)
        if i is None:
            position[other] = -1  # an ANN-only candidate; -1 also marks it seen (dedup)
            extra_ids.append(other)
            extra_cos.append(float(cosine))
        elif i >= 0 and math.isnan(graph_cos[i]):
            graph_cos[i] = float(cosine)
    ann_score = np.asarray(graph_cos, np.float64)
    n_ann_only = len(extra_ids)
    popular_seen: set[int] = set()
    for other in popular:
        if other not in position:
            position[other] = -1
            extra_ids.append(other)
            extra_cos.append(math.nan)
        popular_seen.add(other)
    n_graph, n_extra = len(graph_ids), len(extra_ids)
    ids = np.concatenate([graph_ids, np.asarray(extra_ids, np.int64)])
    counts = np.concatenate([graph_counts, np.fromiter(map(counts_map.get, extra_ids, repeat(0)), np.int64, n_extra)])
    scores = np.concatenate([graph_scores,
                             np.fromiter(map(scores_map.get, extra_ids, repeat(0.0)), np.float64, n_extra)])
    ann_scores = np.concatenate([ann_score, np.asarray(extra_cos, np.float64)])
    from_graph = np.concatenate([np.ones(n_graph, bool), np.zeros(n_extra, bool)])
    from_ann = ~np.isnan(ann_scores)
    from_popular = np.fromiter(map(popular_seen.__contains__, ids.tolist()), np.bool_, len(ids))
    candidates = CandidateSet(user, ids, counts, scores, ann_scores, from_graph, from_ann,
                              {"two_hop": pool, "graph": n_graph, "ann": len(ann), "popular": len(popular),
                               "merged": len(ids), "ann_only": n_ann_only}, from_popular)

    for candidate_filter in filters:
        keep = candidate_filter.keep(user, candidates.ids, source, as_of_ms)
        if not keep.all():
            candidates = candidates.subset(keep)

    rough = candidates.adamic_adar_score + config.ann_weight * np.nan_to_num(
        np.maximum(candidates.ann_score, 0.0), nan=0.0)
    order = np.lexsort((candidates.ids, -candidates.common_neighbor_count, -np.round(rough, _AA_DECIMALS)))
    candidates = candidates.subset(order[: config.max_candidates])
    candidates.stats["filtered"] = len(ids) - len(order)
    candidates.stats["candidates"] = len(candidates)
    return candidates


# ---- the world -------------------------------------------------------------------------------------------------
USERS = 500


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> WorkerWorld:
    return build_world(tmp_path_factory.mktemp("world"), USERS, partitions=2, seed=11)


class LegacySource(WorkerRankingSource):
    """The worker's source as it was: the 2-hop sets as dicts from the dict traversal, and none of the columnar
    reads (a protocol member set to None fails the protocol's isinstance check). Since then both keep the users
    at distance exactly 2 (the traversal also reaches neighbours that close a triangle)."""

    two_hop_arrays = None  # type: ignore[assignment]
    degrees_of = None  # type: ignore[assignment]
    profiles_of = None  # type: ignore[assignment]
    activity_table_of = None  # type: ignore[assignment]
    embeddings_of = None  # type: ignore[assignment]

    def _distance_two(self, user: int) -> tuple[dict[int, int], dict[int, float], dict[int, float]]:
        neighbours = self.graph.neighbours(user)
        maps = self.graph.two_hop_with_allocation(user)
        return tuple({v: x for v, x in m.items() if v not in neighbours} for m in maps)  # type: ignore[return-value]

    def two_hop(self, user: int) -> tuple[dict[int, int], dict[int, float]]:
        counts, scores, _ = self._distance_two(user)
        return counts, scores

    def two_hop_resource_allocation(self, user: int) -> dict[int, float]:
        return self._distance_two(user)[2]

    def common_neighbors(self, user: int, candidate: int) -> Sequence[int]:
        return self.graph.common_neighbors(user, candidate)


def make_source(world: WorkerWorld, cls: type[WorkerRankingSource] = WorkerRankingSource,
                facts: UserFacts | None = None, ann: object = None) -> WorkerRankingSource:
    return cls(world.owned, world.index, world.degree_of, world.profile_of, world.globals.activity,
               world.globals.most_active, ann=ann, facts=facts)  # type: ignore[arg-type]


def local_users(world: WorkerWorld) -> list[int]:
    return sorted(world.owned.graph.local_users())


def unknown_users(world: WorkerWorld, partition: int, n: int) -> list[int]:
    known = {u for state in world.states.values() for u in state.graph.local_users()}
    out: list[int] = []
    user = 10**9
    while len(out) < n:
        user += 1
        if user not in known and world.partition_of(user) == partition:
            out.append(user)
    return out


def assert_same_candidates(got: CandidateSet, expected: CandidateSet) -> None:
    assert got.user == expected.user
    assert got.ids.tolist() == expected.ids.tolist()
    assert got.common_neighbor_count.tolist() == expected.common_neighbor_count.tolist()
    assert got.adamic_adar_score.tobytes() == expected.adamic_adar_score.tobytes()  # bit for bit
    assert got.ann_score.tobytes() == expected.ann_score.tobytes()
    assert got.from_graph.tolist() == expected.from_graph.tolist()
    assert got.from_ann.tolist() == expected.from_ann.tolist()
    assert expected.from_popular is not None and got.from_popular is not None
    assert got.from_popular.tolist() == expected.from_popular.tolist()
    assert got.stats == expected.stats


# ---- the two-hop traversal ---------------------------------------------------------------------------------------
def test_two_hop_arrays_equal_the_dict_traversal_bit_for_bit(world: WorkerWorld) -> None:
    users = [(state, u) for state in world.states.values() for u in sorted(state.graph.local_users())]
    users += [(world.owned, u) for u in unknown_users(world, world.owned.partition, 3)]
    for state, user in users:
        counts, scores, allocation = state.graph.two_hop_with_allocation(user)
        arrays = state.graph.two_hop_arrays(user)
        ids = sorted(counts)
        assert arrays.ids.tolist() == ids
        assert arrays.counts.tolist() == [counts[i] for i in ids]
        assert arrays.adamic_adar.tobytes() == np.array([scores[i] for i in ids], np.float64).tobytes()
        assert arrays.resource_allocation.tobytes() == np.array([allocation[i] for i in ids], np.float64).tobytes()


def test_the_worker_source_gives_the_same_maps_from_its_arrays(world: WorkerWorld) -> None:
    source, legacy = make_source(world), make_source(world, LegacySource)
    assert isinstance(source, TwoHopArraySource) and not isinstance(legacy, TwoHopArraySource)
    for user in local_users(world)[:50]:
        assert source.two_hop(user) == legacy.two_hop(user)
        assert source.two_hop_resource_allocation(user) == legacy.two_hop_resource_allocation(user)


# ---- Stage 1 -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [CandidateConfig(), CandidateConfig(graph_k=5, ann_k=7, popular_k=3),
                                    CandidateConfig(graph_k=3, ann_k=0, popular_k=0, max_candidates=4)])
def test_stage1_equals_the_reference_on_the_worker_state(world: WorkerWorld, config: CandidateConfig) -> None:
    for user in local_users(world):
        got = generate_candidates(user, make_source(world), config, world.event_time_ms)
        expected = reference_candidates(user, make_source(world, LegacySource), config, world.event_time_ms)
        assert_same_candidates(got, expected)


def noisy_ann(world: WorkerWorld, seed: int):  # type: ignore[no-untyped-def]
    """An ANN that ignores ``exclude`` and repeats users, some with a NaN cosine first: the merge's corner cases."""
    users = np.array(sorted({u for s in world.states.values() for u in s.graph.local_users()}), np.int64)

    def search(user: int, k: int, exclude: Collection[int]) -> list[tuple[int, float]]:
        rng = np.random.default_rng([seed, user])
        picked = rng.choice(users, size=min(k, len(users)), replace=True)
        cosines = rng.uniform(-1, 1, len(picked))
        cosines[rng.random(len(picked)) < 0.2] = math.nan
        return [(int(u), float(c)) for u, c in zip(picked, cosines, strict=True)]

    return search


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_stage1_equals_the_reference_with_repeated_excluded_and_nan_ann_hits(world: WorkerWorld, seed: int) -> None:
    config = CandidateConfig(graph_k=20, ann_k=60, popular_k=10)
    for user in local_users(world)[::3]:
        got = generate_candidates(user, make_source(world, ann=noisy_ann(world, seed)), config, world.event_time_ms)
        expected = reference_candidates(user, make_source(world, LegacySource, ann=noisy_ann(world, seed)), config,
                                        world.event_time_ms)
        assert_same_candidates(got, expected)
        assert not set(got.ids.tolist()) & ({user} | set(world.owned.graph.neighbours(user)))


class EvenOnly:
    """A filter with its own keep(): Stage 1 then applies every filter's keep() in turn."""

    def excluded(self, user: int, source: RankingSource, as_of_ms: int) -> Collection[int]:
        return ()

    def keep(self, user: int, ids: np.ndarray, source: RankingSource, as_of_ms: int) -> np.ndarray:
        return ids % 2 == 0


def test_stage1_equals_the_reference_with_a_filter_of_its_own(world: WorkerWorld) -> None:
    config = CandidateConfig()
    filters: list[CandidateFilter] = [*default_filters(config), EvenOnly()]
    for user in local_users(world)[::5]:
        got = generate_candidates(user, make_source(world), config, world.event_time_ms, filters)
        expected = reference_candidates(user, make_source(world, LegacySource), config, world.event_time_ms, filters)
        assert_same_candidates(got, expected)
        assert (got.ids % 2 == 0).all()


def test_common_neighbours_read_once_per_list_equal_the_graphs(world: WorkerWorld) -> None:
    source = make_source(world)
    graph = world.owned.graph
    everyone = sorted({u for s in world.states.values() for u in s.graph.local_users()})
    for user in local_users(world)[::4]:
        for candidate in [*everyone[::7], *unknown_users(world, 1, 1)]:
            assert list(source.common_neighbors(user, candidate)) == graph.common_neighbors(user, candidate)


# ---- the columnar reads ----------------------------------------------------------------------------------------
def assert_columns_equal_per_user_reads(world: WorkerWorld, source: WorkerRankingSource, ids: np.ndarray) -> None:
    assert isinstance(source, IdArraySource)
    per_user = make_source(world, LegacySource)  # no facts: every read goes to the state or user-globals
    users = ids.tolist()
    assert source.degrees_of(ids).tolist() == [world.degree_of(u) for u in users]
    assert source.profiles_of(ids) == [world.profile_of(u) for u in users]
    table = source.activity_table_of(ids)
    held = [per_user._activity(u) for u in users]
    assert table.known.tolist() == [h is not None for h in held]
    assert table.anchors.tolist() == [0 if h is None else h[1] for h in held]
    expected_values = [[0.0] * table.values.shape[1] if h is None else list(h[0]) for h in held]
    assert table.values.tobytes() == np.array(expected_values, np.float64).tobytes()
    vectors = source.embeddings_of(ids)
    for row, user in zip(vectors, users, strict=True):
        vector = world.index.vector(user)
        assert np.isnan(row).all() if vector is None else row.tobytes() == vector.tobytes()
    # and the list reads the feature matrix used before
    assert source.many_profiles(users) == [world.profile_of(u) for u in users]
    assert source.many_degrees(users).tolist() == [world.degree_of(u) for u in users]


def sample_ids(world: WorkerWorld, rng: np.random.Generator, n: int) -> np.ndarray:
    """Local, remote and unknown users (of either partition), with repeats."""
    everyone = sorted({u for s in world.states.values() for u in s.graph.local_users()})
    pool = everyone + unknown_users(world, 0, 5) + unknown_users(world, 1, 5)
    return np.array(rng.choice(pool, size=n, replace=True), np.int64)


def test_columnar_reads_equal_the_per_user_reads_and_follow_changes(world: WorkerWorld) -> None:
    from pymk.bench.worker_list import _route
    from pymk.events import ConnectionEvent, Profile, UserEvent
    from pymk.streams.ingest import apply_event

    refresher = world.refresher()  # its facts are invalidated as the worker's are: collect() and user-globals
    source = make_source(world, facts=refresher.facts)
    rng = np.random.default_rng(3)
    for _ in range(5):
        assert_columns_equal_per_user_reads(world, source, sample_ids(world, rng, 300))
    assert refresher.facts is not None and refresher.facts.reads > 0

    # changes after the facts (and the rows' alive-neighbour arrays) were read: local and remote users connect,
    # disconnect, change profile
    local = local_users(world)
    remote = sorted(world.states[1].graph.local_users())
    for user in [*local, *remote]:
        world.states[world.partition_of(user)].graph.two_hop_arrays(user)
    ts = world.event_time_ms + 1
    events = [ConnectionEvent(local[0], remote[0], "add", ts), ConnectionEvent(local[1], local[2], "add", ts),
              ConnectionEvent(remote[1], remote[2], "add", ts), UserEvent(local[3], ts, Profile(company="Other Co")),
              UserEvent(remote[3], ts, Profile(school="Elsewhere"))]
    neighbour = next(iter(world.owned.graph.neighbours(local[4])))
    events.append(ConnectionEvent(local[4], neighbour, "remove", ts))
    for event in events:
        key = event.src if isinstance(event, ConnectionEvent) else event.key
        apply_event(world.states[world.partition_of(key)], event, b"", world.partition_of, lambda kind: kind)
    _route(world.states, world.globals)  # user-globals records: the listener invalidates the remote users
    refresher.collect(world.owned, ts)  # the local users' own rows changed
    changed = np.array([local[0], remote[0], local[1], local[2], remote[1], remote[2], local[3], remote[3],
                        local[4], neighbour], np.int64)
    assert_columns_equal_per_user_reads(world, make_source(world, facts=refresher.facts), changed)
    for _ in range(3):
        assert_columns_equal_per_user_reads(world, make_source(world, facts=refresher.facts),
                                            sample_ids(world, rng, 300))
    # the rows' kept alive-neighbour arrays (read by the earlier traversals) followed the changes too
    for user in [*local_users(world), *remote]:
        graph = world.states[world.partition_of(user)].graph
        counts, scores, _ = graph.two_hop_with_allocation(user)
        arrays = graph.two_hop_arrays(user)
        assert dict(zip(arrays.ids.tolist(), arrays.counts.tolist(), strict=True)) == counts
        assert dict(zip(arrays.ids.tolist(), arrays.adamic_adar.tolist(), strict=True)) == scores


# ---- what is published -------------------------------------------------------------------------------------------
def legacy_shown_impressions(ranked: RankedList, ts: int, as_of: int) -> list[Impression]:
    """The shown impressions as Refresher.rank built them before ranking/impressions.py."""
    return [Impression(user=ranked.user, candidate=item.candidate.user, rank=item.rank, score=item.score,
                       model_version=ranked.model_version, features=ranked.features_of(i), ts=ts, as_of=as_of,
                       sources=item.sources)
            for i, item in enumerate(ranked.items)]


def legacy_unshown_impressions(user: int, scored: ScoredCandidates, sample: Sequence[tuple[int, float]],
                               model_version: str, ts: int, as_of: int) -> list[Impression]:
    indices = [index for index, _ in sample]
    candidates = scored.candidates
    return [Impression(user=user, candidate=candidate, rank=0, score=score, model_version=model_version,
                       features=feature_dict(row), ts=ts, as_of=as_of, sources=sources, weight=weight)
            for (_, weight), candidate, score, row, sources in zip(
                sample, candidates.ids[indices].tolist(), scored.scores[indices].tolist(),
                scored.features[indices], candidates.sources_of(indices), strict=True)]


def test_published_lists_and_impressions_are_the_same_as_before(world: WorkerWorld,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import pymk.streams.refresh as refresh_module

    users = local_users(world)[::6]
    now = world.event_time_ms + 10
    got = [world.refresher().rank(world.owned, user, now) for user in users]
    monkeypatch.setattr(refresh_module, "WorkerRankingSource", LegacySource)
    monkeypatch.setattr(refresh_module, "shown_impressions", legacy_shown_impressions)
    monkeypatch.setattr(refresh_module, "unshown_impressions", legacy_unshown_impressions)
    expected = [world.refresher().rank(world.owned, user, now) for user in users]
    assert sum(len(recommendations.items) for recommendations, _ in got) > 0
    assert sum(1 for _, impressions in got for i in impressions if i.rank == 0) > 0
    for (recommendations, impressions), (expected_recommendations, expected_impressions) in zip(got, expected,
                                                                                                strict=True):
        assert recommendations.to_json() == expected_recommendations.to_json()
        assert impressions == expected_impressions
        assert [i.to_json() for i in impressions] == [i.to_json() for i in expected_impressions]
        unshown = [i for i in impressions if i.rank == 0]
        if unshown:
            expected_unshown = [i for i in expected_impressions if i.rank == 0]
            assert unshown_sample_to_json(unshown) == unshown_sample_to_json(expected_unshown)


@pytest.mark.parametrize("seed", [0, 1])
def test_feature_dicts_equal_feature_dict_per_row(seed: int) -> None:
    rng = np.random.default_rng(seed)
    rows = rng.normal(size=(50, len(FEATURE_NAMES)))
    rows[rng.random(rows.shape) < 0.2] = np.nan
    rows[0, 3], rows[1, 4], rows[2, 5] = np.inf, -np.inf, -0.0
    got = feature_dicts(rows)
    expected = [feature_dict(row) for row in rows]
    assert got == expected
    assert [list(d) for d in got] == [list(d) for d in expected]  # the same key order: the same JSON
    assert feature_dicts(np.empty((0, len(FEATURE_NAMES)))) == []
    with pytest.raises(ValueError):
        feature_dicts(rows[:, :-1])


def test_impressions_of_a_list_equal_the_dataclass_built_ones() -> None:
    features: dict[str, float | None] = {"a": 1.0, "b": None}
    made = Impression.of_list(7, "v1", 100, 90, [(3, 1, 0.5, features, ("graph",), 1.0),
                                                 (4, 0, 0.25, features, (), 2.5)])
    expected = [Impression(user=7, candidate=3, rank=1, score=0.5, model_version="v1", features=features, ts=100,
                           as_of=90, sources=("graph",)),
                Impression(user=7, candidate=4, rank=0, score=0.25, model_version="v1", features=features, ts=100,
                           as_of=90, sources=(), weight=2.5)]
    assert made == expected
    assert [i.to_json() for i in made] == [i.to_json() for i in expected]
    with pytest.raises(AttributeError):  # still frozen
        made[0].rank = 2  # type: ignore[misc]


# ---- the worker's embedder ---------------------------------------------------------------------------------------
class PerNodeNeighbours:
    """The partition's neighbours as collections, one call per node (no ``neighbour_array``)."""

    def __init__(self, world: WorkerWorld) -> None:
        from pymk.streams.ranking_source import PartitionGraphView

        self.view = PartitionGraphView(world.owned)

    def neighbours(self, user: int) -> Sequence[int]:
        return self.view.neighbours(user)


def test_worker_embeddings_equal_the_per_node_reads_and_follow_changes(world: WorkerWorld) -> None:
    """The refresher's embedder (neighbour arrays, the batch's profiles and degrees from the fact slots, profile
    encodings by identity) gives the bytes of per-node reads, also after profiles and edges change."""
    from pymk.bench.worker_list import _route
    from pymk.events import ConnectionEvent, Profile, UserEvent
    from pymk.index.embedder import Embedder, salt_for_version
    from pymk.streams.ingest import apply_event
    from pymk.streams.ranking_source import WorkerNodeFeatures

    refresher = world.refresher()
    model = refresher.models.sage
    salt = salt_for_version(refresher.models.embedding_model)
    local = local_users(world)

    def assert_same(users: list[int]) -> np.ndarray:
        fast = refresher.embedder(world.owned).embed(users, salt)
        slow = Embedder(model, WorkerNodeFeatures(world.degree_of, world.profile_of), PerNodeNeighbours(world),
                        threads=1).embed(users, salt)
        assert fast.tobytes() == slow.tobytes()
        return fast

    before = assert_same(local[:16])
    for start in (40, 80):
        assert_same(local[start:start + 16])
    assert refresher.facts is not None and refresher.facts.reads > 0
    remote = sorted(world.states[1].graph.local_users())
    ts = world.event_time_ms + 2
    neighbour = next(iter(world.owned.graph.neighbours(local[5])))
    events = [ConnectionEvent(local[0], remote[5], "add", ts), ConnectionEvent(local[1], local[2], "add", ts),
              UserEvent(local[3], ts, Profile(company="Moved Co")), UserEvent(remote[6], ts, Profile(school="Far")),
              ConnectionEvent(local[5], neighbour, "remove", ts)]
    events.extend(ConnectionEvent(local[4], user, "add", ts) for user in remote[6:9])
    for event in events:
        key = event.src if isinstance(event, ConnectionEvent) else event.key
        apply_event(world.states[world.partition_of(key)], event, b"", world.partition_of, lambda kind: kind)
    _route(world.states, world.globals)
    refresher.collect(world.owned, ts)
    after = assert_same(local[:16])
    assert all(not np.array_equal(before[i], after[i]) for i in (0, 1, 3, 4, 5))  # the changes reached them
    assert_same([local[5], neighbour] if world.partition_of(neighbour) == 0 else [local[5]])
