"""The ranking core: Stage 1 candidates, the feature matrix (17 seed + activity features), scorers, reasons
and the invariants of a ranked list. Pure code on small random graphs; every expected value is computed
independently (networkx or plain python over the raw events), never read back from the code under test."""

from __future__ import annotations

import json
import math
import random
import re
from collections import defaultdict

import networkx as nx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pymk.events import Profile, Recommendations
from pymk.features import profile as profile_features
from pymk.ranking.candidates import (
    ANN,
    GRAPH,
    POPULAR,
    Candidate,
    CandidateConfig,
    CandidateSet,
    ExcludeBlocked,
    ExcludeConnections,
    ExcludeDismissed,
    ExcludeSelf,
    generate_candidates,
)
from pymk.ranking.features import (
    ACTIVITY_FEATURES,
    FEATURE_INDEX,
    FEATURE_NAMES,
    N_FEATURES,
    FeatureBuilder,
    ProfileCache,
    feature_dict,
)
from pymk.ranking.heuristic import HeuristicScorer
from pymk.ranking.memory_source import MemorySource
from pymk.ranking.model import Ranker, RankerConfig, roc_auc
from pymk.ranking.reasons import QUERY_ONLY_FEATURES, build_reasons, list_relative_contributions, reason_text
from pymk.ranking.recommend import ranking_order, recommend
from pymk.ranking.source import (
    ACTIVITY_TIME_CONSTANTS_MS,
    ActivitySource,
    ActivityTableSource,
    BatchReadSource,
    PopularSource,
    RankingSource,
    ResourceAllocationSource,
    Scorer,
)

DAY_MS = 86_400_000
NOW = 1_700_000_000_000
COMPANIES = ["Acme", "ACME ", "Globex", "Initech", None]
SCHOOLS = ["MIT", "Stanford", None]
INDUSTRIES = ["software", "finance", None]
SKILLS = ["python", "Java", "sql", "go", "rust", "kafka", "spark"]
TITLES = ["software engineer", "senior software engineer", "data scientist", "head of sales", None]
SEED_FEATURE_NAMES = (  # the seed spec's 17 features, in its order: new features only ever come after them
    "common_neighbor_count", "adamic_adar_score", "jaccard_sim", "graph_distance_bucket", "query_degree_log",
    "candidate_degree_log", "query_viewed_candidate_profile", "profile_view_recency_days", "mutual_profile_views",
    "co_engaged_with_content", "same_company_current", "same_school", "same_industry", "skill_jaccard_sim",
    "title_cosine_sim", "geo_distance_km", "gnn_embedding_cosine_sim")


class World:
    """A MemorySource and the raw facts it was built from (for independent expected values)."""

    def __init__(self, seed: int, n: int = 40, p: float = 0.12, embedded_share: float = 0.7) -> None:
        rnd = random.Random(seed)
        self.graph = nx.gnp_random_graph(n, p, seed=seed)
        self.source = MemorySource()
        for u in self.graph.nodes:
            self.source.add_user(u)
        # Connections at random times over 60 days, added out of time order (the activity counters must not
        # care); a separate generator so the rest of the world is what it was.
        stamps = random.Random(seed + 1000)
        self.connection_ts: dict[int, list[int]] = defaultdict(list)
        for u, v in self.graph.edges:
            ts = NOW - DAY_MS - stamps.randrange(60 * DAY_MS)
            self.source.add_connection(u, v, ts)
            self.connection_ts[u].append(ts)
            self.connection_ts[v].append(ts)
        self.views: list[tuple[int, int, int]] = []
        for _ in range(3 * n):
            a, b = rnd.sample(range(n), 2)
            ts = NOW - rnd.randrange(0, 30) * DAY_MS - rnd.randrange(1000)
            self.views.append((a, b, ts))
            self.source.add_view(a, b, ts)
            if rnd.random() < 0.2:  # an exact duplicate event: no new distinct view
                self.source.add_view(a, b, ts)
        self.engaged: dict[int, set[int]] = defaultdict(set)
        for _ in range(2 * n):
            user, item = rnd.randrange(n), 10**9 + rnd.randrange(12)
            self.engaged[user].add(item)
            self.source.add_engagement(user, item, NOW - rnd.randrange(10**6))
        self.profiles: dict[int, Profile] = {}
        for u in range(n):
            if rnd.random() < 0.15:
                continue  # no profile at all
            profile = Profile(
                company=rnd.choice(COMPANIES), school=rnd.choice(SCHOOLS), industry=rnd.choice(INDUSTRIES),
                title=rnd.choice(TITLES),
                skills=tuple(rnd.sample(SKILLS, rnd.randrange(0, 5))) if rnd.random() < 0.9 else None,
                geo=(rnd.uniform(-60, 60), rnd.uniform(-180, 180)) if rnd.random() < 0.8 else None)
            self.profiles[u] = profile
            self.source.set_profile(u, profile)
        rng = np.random.default_rng(seed)
        self.vectors = {u: rng.normal(size=128).astype(np.float32) for u in range(n)
                        if rnd.random() < embedded_share}
        self.source.set_embeddings(self.vectors)

    def common(self, u: int, v: int) -> list[int]:
        return sorted(set(self.graph[u]) & set(self.graph[v]))


def expected_activity(world: World, user: int, time_constant_days: float) -> float:
    return sum(math.exp(-(NOW - ts) / (time_constant_days * DAY_MS)) for ts in world.connection_ts[user])


def expected_days_since(world: World, user: int) -> float:
    stamps = world.connection_ts[user]
    return (NOW - max(stamps)) / DAY_MS if stamps else math.nan


def expected_row(world: World, u: int, v: int) -> dict[str, float]:
    """Every feature of (u, v), from networkx, the raw events and pymk.features.profile."""
    g = world.graph
    common = world.common(u, v)
    union = set(g[u]) | set(g[v])
    out_stamps = {ts for a, b, ts in world.views if (a, b) == (u, v)}
    in_stamps = {ts for a, b, ts in world.views if (a, b) == (v, u)}
    latest = max(out_stamps | in_stamps, default=None)
    a, b = world.profiles.get(u), world.profiles.get(v)
    geo = profile_features.geo_distance_km(a, b)
    if u in world.vectors and v in world.vectors:
        x, y = world.vectors[u], world.vectors[v]
        cosine = float(np.dot(x / np.linalg.norm(x), y / np.linalg.norm(y)))
    else:
        cosine = math.nan
    try:
        distance = nx.shortest_path_length(g, u, v)
    except nx.NetworkXNoPath:
        distance = math.inf
    return {
        "common_neighbor_count": len(common),
        "adamic_adar_score": sum(1 / math.log(g.degree(z)) for z in common if g.degree(z) > 1),
        "jaccard_sim": len(common) / len(union) if union else 0.0,
        "graph_distance_bucket": 2 if distance == 2 else 3,
        "query_degree_log": math.log1p(g.degree(u)),
        "candidate_degree_log": math.log1p(g.degree(v)),
        "query_viewed_candidate_profile": len(out_stamps),
        "profile_view_recency_days": math.nan if latest is None else max(0, NOW - latest) / DAY_MS,
        "mutual_profile_views": min(len(out_stamps), len(in_stamps)),
        "co_engaged_with_content": len(world.engaged[u] & world.engaged[v]),
        "same_company_current": profile_features.same_company_current(a, b),
        "same_school": profile_features.same_school(a, b),
        "same_industry": profile_features.same_industry(a, b),
        "skill_jaccard_sim": profile_features.skill_jaccard_sim(a, b),
        "title_cosine_sim": profile_features.title_cosine_sim(a, b),
        "geo_distance_km": math.nan if geo is None else geo,
        "gnn_embedding_cosine_sim": cosine,
        "candidate_activity_1d": expected_activity(world, v, 1),
        "candidate_activity_7d": expected_activity(world, v, 7),
        "candidate_activity_30d": expected_activity(world, v, 30),
        "candidate_days_since_last_connection": expected_days_since(world, v),
        "query_activity_7d": expected_activity(world, u, 7),
        "query_days_since_last_connection": expected_days_since(world, u),
        "resource_allocation_score": sum(1 / g.degree(z) for z in common),
        **expected_structure(world, u, v),
    }


def expected_structure(world: World, u: int, v: int) -> dict[str, float]:
    """The common-neighbour structure columns of (u, v) by their definitions, from networkx."""
    g = world.graph
    common = sorted(world.common(u, v))
    degrees = [g.degree(z) for z in common]
    inside = [len(set(g[z]) & set(g[u])) for z in common]
    return {
        "cn_degree_1_4": sum(d <= 4 for d in degrees),
        "cn_degree_5_16": sum(5 <= d <= 16 for d in degrees),
        "cn_degree_17_64": sum(17 <= d <= 64 for d in degrees),
        "cn_degree_over_64": sum(d > 64 for d in degrees),
        "cn_min_degree": min(degrees, default=math.nan),
        "cn_max_degree": max(degrees, default=math.nan),
        "ego_three_path_count": sum(inside),
        "cn_ego_embeddedness": sum(i / d for i, d in zip(inside, degrees, strict=True)),
        "cn_share_of_candidate": len(common) / g.degree(v) if g.degree(v) else 0.0,
        "cn_share_of_query": len(common) / g.degree(u) if g.degree(u) else 0.0,
    }


# libm vs numpy in the last bit; sums of the same terms in another order
APPROXIMATE = ("geo_distance_km", "adamic_adar_score", "resource_allocation_score", "candidate_activity_1d",
               "candidate_activity_7d", "candidate_activity_30d", "query_activity_7d", "cn_ego_embeddedness")


def assert_row_equal(row: np.ndarray, expected: dict[str, float], context: str) -> None:
    for name, value in expected.items():
        got = row[FEATURE_INDEX[name]]
        if math.isnan(value):
            assert math.isnan(got), (context, name, got)
        elif name == "gnn_embedding_cosine_sim":
            assert got == pytest.approx(value, abs=1e-5), (context, name)
        elif name in APPROXIMATE:
            assert got == pytest.approx(value, rel=1e-12, abs=1e-12), (context, name)
        else:
            assert got == value, (context, name, got, value)  # bit for bit


# ---- the source ---------------------------------------------------------------------------------------------
def test_memory_source_is_a_ranking_source_with_exact_two_hop() -> None:
    world = World(seed=1)
    source = world.source
    assert isinstance(source, RankingSource)
    for u in world.graph.nodes:
        counts, scores = source.two_hop(u)
        expected = {v for v in world.graph.nodes if v != u and not world.graph.has_edge(u, v) and world.common(u, v)}
        assert set(counts) == expected
        for v in expected:
            assert counts[v] == len(world.common(u, v))
            assert scores[v] == pytest.approx(expected_row(world, u, v)["adamic_adar_score"], rel=1e-12)
            assert source.common_neighbors(u, v) == world.common(u, v)
        assert source.degree(u) == world.graph.degree(u)


def test_profile_views_are_distinct_counts_and_the_latest_either_way() -> None:
    source = MemorySource()
    source.add_view(1, 2, 100)
    source.add_view(1, 2, 100)  # duplicate event
    source.add_view(1, 2, 300)
    source.add_view(2, 1, 200)
    source.add_view(3, 1, 50)
    assert source.profile_views(1) == {2: (2, 1, 300), 3: (0, 1, 50)}
    assert source.profile_views(2) == {1: (1, 2, 300)}


def test_activity_is_a_decayed_count_of_alive_connections_with_the_workers_register_rules() -> None:
    source = MemorySource()
    assert isinstance(source, ActivitySource)
    assert source.connection_activity(1, NOW) == (0.0, 0.0, 0.0) and source.last_connection_ts(1) is None
    source.add_connection(1, 2, NOW - 3 * DAY_MS)
    source.add_connection(1, 3, NOW - 10 * DAY_MS)
    source.add_connection(1, 3, NOW - 2 * DAY_MS)  # a later add of the same edge: the edge's ts moves (LWW)
    source.add_connection(1, 3, NOW - 5 * DAY_MS)  # an older one: nothing changes
    source.add_connection(1, 4, NOW - DAY_MS)
    source.remove_connection(1, 4, NOW - DAY_MS // 2)  # a change of the anchor; the edge no longer counts
    source.add_connection(1, 4, NOW - 3 * DAY_MS // 4)  # older than the removal: ignored, as by the worker
    assert source.neighbours(1) == {2, 3}
    for got, time_constant in zip(source.connection_activity(1, NOW), ACTIVITY_TIME_CONSTANTS_MS, strict=True):
        assert got == pytest.approx(sum(math.exp(-days * DAY_MS / time_constant) for days in (3, 2)), rel=1e-12)
    assert source.last_connection_ts(1) == NOW - DAY_MS // 2
    assert source.last_connection_ts(3) == NOW - 2 * DAY_MS
    assert source.connection_activity(3, NOW)[0] == pytest.approx(math.exp(-2), rel=1e-12)
    assert source.connection_activity(4, NOW) == (0.0, 0.0, 0.0) and source.last_connection_ts(4) == NOW - DAY_MS // 2


def test_activity_read_before_its_anchor_is_the_anchor_value() -> None:
    """A user of another partition may have events far ahead of this partition's event time (a live event
    next to a replayed history): reading before the anchor must not grow the values (nor overflow)."""
    from pymk.features.activity import activity_at

    values = (1.5, 2.0, 3.0)
    assert activity_at(values, anchor_ms=NOW, as_of_ms=NOW - 10**12) == values
    assert activity_at(values, anchor_ms=NOW, as_of_ms=NOW + DAY_MS)[0] == pytest.approx(1.5 * math.exp(-1))


def test_activity_equals_the_workers_degree_update() -> None:
    """The offline source and the worker compute activity with the same function of the same registers."""
    from pymk.features.graph import DegreeUpdate, PartitionGraph, Registers, edge_version

    world = World(seed=3)
    for u in list(world.graph.nodes)[:10]:
        row = Registers({v: edge_version(ts, "add") for v, ts in
                         ((v, world.source.registers[u][v] >> 1) for v in world.graph[u])})
        update: DegreeUpdate = PartitionGraph.degree_update(u, row, 0)
        assert world.source.activity.get(u, ((0.0, 0.0, 0.0), 0)) == ((update.activity, update.last_ts)
                                                                      if row.versions else ((0.0, 0.0, 0.0), 0))


class GraphOnlySource:
    """A RankingSource without the optional extensions (as a worker that does not serve them yet)."""

    def __init__(self, source: MemorySource) -> None:
        self._source = source

    def __getattr__(self, name: str) -> object:
        if name in ("connection_activity", "last_connection_ts", "two_hop_resource_allocation", "most_active"):
            raise AttributeError(name)
        return getattr(self._source, name)


def test_activity_features_are_missing_for_a_source_without_activity() -> None:
    world = World(seed=6)
    plain = GraphOnlySource(world.source)
    assert isinstance(plain, RankingSource)
    assert not isinstance(plain, ActivitySource | ResourceAllocationSource | PopularSource)
    candidates = generate_candidates(0, world.source, CandidateConfig(), NOW)
    full = FeatureBuilder().matrix(0, candidates, world.source, NOW)
    reduced = FeatureBuilder().matrix(0, candidates, plain, NOW)  # type: ignore[arg-type]
    extensions = [FEATURE_INDEX[name] for name in (*ACTIVITY_FEATURES, "resource_allocation_score")]
    seed_columns = [column for column in range(len(FEATURE_NAMES)) if column not in extensions]
    assert np.array_equal(full[:, seed_columns], reduced[:, seed_columns], equal_nan=True)
    assert np.isnan(reduced[:, extensions]).all()
    assert not np.isnan(full[:, extensions]).any()
    assert FEATURE_NAMES[:17] == SEED_FEATURE_NAMES


class PerUserSource:
    """The same source read one user at a time (without the batch reads of ActivityTableSource,
    BatchReadSource and IdArraySource): the matrix must not depend on which path it took."""

    def __init__(self, source: MemorySource) -> None:
        self._source = source

    def __getattr__(self, name: str) -> object:
        if name in ("activity_table", "many_degrees", "many_profiles", "degrees_of", "activity_table_of",
                    "embeddings_of"):
            raise AttributeError(name)
        return getattr(self._source, name)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_reads_give_the_per_user_matrix_bit_for_bit(seed: int) -> None:
    world = World(seed)
    world.source.add_user(999)  # a candidate that never connected: no activity, no profile, no embedding
    plain = PerUserSource(world.source)
    assert isinstance(world.source, ActivityTableSource | BatchReadSource)
    assert not isinstance(plain, ActivityTableSource | BatchReadSource) and isinstance(plain, ActivitySource)
    for user in range(0, 40, 4):
        candidates = generate_candidates(user, world.source, CandidateConfig(), NOW)
        extra = CandidateSet(user, np.array([999], np.int64), np.array([0]), np.array([0.0]), np.array([np.nan]),
                             np.array([False]), np.array([False]))
        for as_of in (NOW, NOW + 3 * DAY_MS + 12_345, NOW - 40 * DAY_MS):  # also before some anchors
            for chosen in (candidates, extra):
                batch = FeatureBuilder().matrix(user, chosen, world.source, as_of)
                single = FeatureBuilder().matrix(user, chosen, plain, as_of)  # type: ignore[arg-type]
                assert batch.tobytes() == single.tobytes(), (user, as_of)


def test_hub_items_are_not_counted_with_a_fanout_limit() -> None:
    source = MemorySource(max_item_fanout=2)
    for user in (1, 2, 3):
        source.add_engagement(user, 100, 10)  # 3 engagers: a hub
    source.add_engagement(1, 200, 10)
    source.add_engagement(2, 200, 10)
    assert source.co_engaged_counts(1) == {2: 1}


# ---- features ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_feature_matrix_equals_independent_per_pair_computation(seed: int) -> None:
    world = World(seed)
    builder = FeatureBuilder()
    config = CandidateConfig(graph_k=50, ann_k=8, max_candidates=100)
    checked = 0
    for user in range(0, 40, 3):
        candidates = generate_candidates(user, world.source, config, NOW)
        matrix = builder.matrix(user, candidates, world.source, NOW)
        assert matrix.shape == (len(candidates), len(FEATURE_NAMES))
        for row, candidate in zip(matrix, candidates.ids.tolist(), strict=True):
            assert_row_equal(row, expected_row(world, user, candidate), f"seed {seed} pair {user}-{candidate}")
            checked += 1
        # The second call hits the profile cache and must give the same matrix.
        assert np.array_equal(builder.matrix(user, candidates, world.source, NOW), matrix, equal_nan=True)
    assert checked > 50


def test_pair_features_by_name_are_json_ready() -> None:
    world = World(seed=5)
    user = 0
    candidate = next(v for v in world.graph.nodes if v != user and not world.graph.has_edge(user, v))
    pair = FeatureBuilder().pair(user, candidate, world.source, NOW)
    assert list(pair) == list(FEATURE_NAMES)
    json.dumps(pair, allow_nan=False)
    expected = expected_row(world, user, candidate)
    for name, value in pair.items():
        assert (value is None) == math.isnan(expected[name])


def test_profile_cache_reparses_changed_profiles_and_handles_long_lists() -> None:
    source = MemorySource()
    for u in range(4):
        source.add_user(u)
    many_skills = tuple(f"skill {i}" for i in range(100))  # beyond the padded width
    long_title = " ".join(f"word{i}" for i in range(80))
    source.set_profile(0, Profile(company="Acme", skills=many_skills, title=long_title, geo=(10.0, 20.0)))
    source.set_profile(1, Profile(company="acme", skills=many_skills[::2], title=long_title + " word3"))
    source.set_profile(2, Profile(company="Globex", skills=("skill 3", "python"), title="word3 word3"))
    cache = ProfileCache()
    builder = FeatureBuilder(cache)
    candidates = CandidateSet.from_candidates(0, [Candidate(v, (ANN,), 0, 0.0, 0.5) for v in (1, 2, 3)])

    def check() -> None:
        matrix = builder.matrix(0, candidates, source, NOW)
        for row, v in zip(matrix, (1, 2, 3), strict=True):
            a, b = source.profile(0), source.profile(v)
            assert row[FEATURE_INDEX["same_company_current"]] == profile_features.same_company_current(a, b)
            assert row[FEATURE_INDEX["skill_jaccard_sim"]] == profile_features.skill_jaccard_sim(a, b)
            assert row[FEATURE_INDEX["title_cosine_sim"]] == profile_features.title_cosine_sim(a, b)

    check()
    parses = cache.parses
    check()
    assert cache.parses == parses  # unchanged profiles are not parsed again
    source.set_profile(2, Profile(company="ACME", skills=many_skills[:70]))  # user 2 changes job
    check()
    assert cache.parses == parses + 1
    assert builder.matrix(0, candidates, source, NOW)[1, FEATURE_INDEX["same_company_current"]] == 1
    source.profiles[1] = Profile(**source.profiles[1].to_dict() | {"skills": many_skills[::2]})  # an equal copy
    check()
    assert cache.parses == parses + 1  # equal, not identical: compared, not parsed
    assert cache.profile(1) is source.profiles[1]  # and held from now on: the next list compares identities only
    del source.profiles[1]  # no profile any more
    check()
    assert builder.matrix(0, candidates, source, NOW)[0, FEATURE_INDEX["same_company_current"]] == 0


# ---- stage 1 -----------------------------------------------------------------------------------------------------
def test_candidates_take_the_top_of_each_source_and_remember_sources() -> None:
    world = World(seed=7, n=60, p=0.1)
    source, g = world.source, world.graph
    config = CandidateConfig(graph_k=10, ann_k=6, popular_k=5, max_candidates=100)
    for user in range(0, 60, 5):
        candidates = generate_candidates(user, source, config, NOW)
        ids = candidates.ids.tolist()
        assert len(ids) == len(set(ids))  # deduplicated
        two_hop = [v for v in g.nodes if v != user and not g.has_edge(user, v) and world.common(user, v)]
        ranked = sorted(two_hop, key=lambda v: (-len(world.common(user, v)),
                                                -round(expected_row(world, user, v)["adamic_adar_score"], 9),
                                                -g.degree(v), v))
        expected_graph = set(ranked[:10])
        if user in world.vectors:
            query = world.vectors[user] / np.linalg.norm(world.vectors[user])
            cosines = {v: float(np.dot(query, world.vectors[v] / np.linalg.norm(world.vectors[v])))
                       for v in world.vectors if v != user and not g.has_edge(user, v)}
            expected_ann = set(sorted(cosines, key=lambda v: (-cosines[v], v))[:6])
        else:
            expected_ann = set()
        # The most active users by 7-day decayed activity, ties by degree then id, minus the user and friends.
        active = sorted((v for v in g.nodes if g.degree(v) and v != user and not g.has_edge(user, v)),
                        key=lambda v: (-round(expected_activity(world, v, 7), 12), -g.degree(v), v))
        expected_popular = set(active[:5])
        assert set(ids) == expected_graph | expected_ann | expected_popular
        for i, v in enumerate(ids):
            assert candidates.sources(i) == tuple(s for s, member in ((GRAPH, v in expected_graph),
                                                                     (ANN, v in expected_ann),
                                                                     (POPULAR, v in expected_popular)) if member)
            assert candidates.common_neighbor_count[i] == len(world.common(user, v))
            assert (candidates.ann_score[i] == pytest.approx(cosines[v], abs=1e-5) if v in expected_ann
                    else math.isnan(candidates.ann_score[i]))
        assert candidates.stats["two_hop"] == len(two_hop)
        every = list(range(len(ids)))
        assert candidates.sources_of(every[::-1]) == [candidates.sources(i) for i in every[::-1]]


def test_the_rough_cut_respects_max_candidates() -> None:
    world = World(seed=8, n=80, p=0.15)
    config = CandidateConfig(graph_k=30, ann_k=30, max_candidates=25)
    for user in range(0, 80, 7):
        candidates = generate_candidates(user, world.source, config, NOW)
        assert len(candidates) <= 25
        rough = candidates.adamic_adar_score + 2.0 * np.nan_to_num(np.maximum(candidates.ann_score, 0), nan=0)
        assert np.all(np.diff(np.round(rough, 9)) <= 0)  # ordered by rough score


def test_graph_ties_break_by_degree_then_id() -> None:
    # 0 - 1 - {2, 3, 4}; 3 and 4 also have degree 2 (one more friend each), 2 has degree 1.
    source = MemorySource()
    for v in (2, 3, 4):
        source.add_connection(1, v)
    source.add_connection(0, 1)
    source.add_connection(3, 10)
    source.add_connection(4, 11)
    candidates = generate_candidates(0, source, CandidateConfig(graph_k=2, ann_k=0), NOW)
    assert sorted(candidates.ids.tolist()) == [3, 4]  # same CN and AA: higher degree wins over id 2
    candidates = generate_candidates(0, source, CandidateConfig(graph_k=1, ann_k=0), NOW)
    assert candidates.ids.tolist() == [3]  # same degree: lower id


def test_filters_compose_and_dismissals_expire() -> None:
    source = MemorySource()
    for v in (2, 3, 4, 5):
        source.add_connection(1, v)
    source.add_connection(0, 1)
    source.add_dismissal(0, 2, NOW - 10 * DAY_MS)  # old
    source.add_dismissal(0, 3, NOW - DAY_MS)  # recent
    source.block(0, 4)
    never = generate_candidates(0, source, CandidateConfig(ann_k=0), NOW)
    assert never.ids.tolist() == [5]
    week = generate_candidates(0, source, CandidateConfig(ann_k=0, dismissal_expiry_ms=7 * DAY_MS), NOW)
    assert sorted(week.ids.tolist()) == [2, 5]
    only_self = generate_candidates(0, source, CandidateConfig(ann_k=0), NOW, filters=[ExcludeSelf()])
    assert sorted(only_self.ids.tolist()) == [2, 3, 4, 5]
    chain = [ExcludeSelf(), ExcludeConnections(), ExcludeDismissed(None), ExcludeBlocked()]
    assert generate_candidates(0, source, CandidateConfig(ann_k=0), NOW, filters=chain).ids.tolist() == [5]


# ---- invariants of a ranked list (property test) -------------------------------------------------------------
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6), n=st.integers(2, 30), p=st.floats(0.05, 0.5), k=st.integers(1, 25),
       expiry_days=st.one_of(st.none(), st.integers(0, 20)), data=st.data())
def test_ranked_list_invariants(seed: int, n: int, p: float, k: int, expiry_days: int | None,
                                data: st.DataObject) -> None:
    world = World(seed, n=n, p=p)
    source = world.source
    rnd = random.Random(seed)
    dismissed_at: dict[tuple[int, int], int] = {}
    for _ in range(data.draw(st.integers(0, 3 * n))):
        user, other = rnd.randrange(n), rnd.randrange(n)
        ts = NOW - rnd.randrange(0, 30) * DAY_MS
        source.add_dismissal(user, other, ts)
        dismissed_at[(user, other)] = max(ts, dismissed_at.get((user, other), ts))
    blocked = {(rnd.randrange(n), rnd.randrange(n)) for _ in range(n)}
    for user, other in blocked:
        source.block(user, other)
    expiry = None if expiry_days is None else expiry_days * DAY_MS
    config = CandidateConfig(graph_k=data.draw(st.integers(0, 15)), ann_k=data.draw(st.integers(0, 15)),
                             max_candidates=data.draw(st.integers(1, 30)), dismissal_expiry_ms=expiry)
    user = data.draw(st.integers(0, n - 1))
    ranked = recommend(user, source, HeuristicScorer(), config, NOW, k=k)
    shown = [item.candidate.user for item in ranked.items]
    assert len(shown) <= k and len(shown) == len(set(shown))
    assert [item.rank for item in ranked.items] == list(range(1, len(shown) + 1))
    assert user not in shown
    assert not set(shown) & set(world.graph[user])
    for other in shown:
        assert (user, other) not in blocked
        ts = dismissed_at.get((user, other))
        assert ts is None or (expiry is not None and NOW - ts > expiry)
    scores = [item.score for item in ranked.items]
    assert scores == sorted(scores, reverse=True)
    for a, b in zip(ranked.items, ranked.items[1:], strict=False):  # ties: higher degree, then lower id
        if a.score == b.score:
            key_a = (-world.graph.degree(a.candidate.user), a.candidate.user)
            key_b = (-world.graph.degree(b.candidate.user), b.candidate.user)
            assert key_a < key_b
    assert ranked.feature_matrix_of_items.shape == (len(shown), len(FEATURE_NAMES))
    Recommendations.from_json(ranked.to_recommendations().to_json())  # JSON-ready, no NaN


def test_an_expired_dismissal_brings_the_candidate_back() -> None:
    source = MemorySource()
    source.add_connection(0, 1)
    source.add_connection(1, 2)
    source.add_dismissal(0, 2, NOW - 30 * DAY_MS)
    scorer = HeuristicScorer()
    assert recommend(0, source, scorer, CandidateConfig(), NOW).items == ()
    week = CandidateConfig(dismissal_expiry_ms=7 * DAY_MS)
    assert [item.candidate.user for item in recommend(0, source, scorer, week, NOW).items] == [2]


def test_ranking_order_breaks_ties_by_degree_then_id() -> None:
    scores = np.array([1.0, 2.0, 2.0, 2.0, 0.5])
    degree_key = np.log1p(np.array([9, 3, 5, 5, 1]))
    ids = np.array([10, 11, 14, 12, 13])
    assert ids[ranking_order(scores, degree_key, ids, 3)].tolist() == [12, 14, 11]
    assert ids[ranking_order(scores, degree_key, ids, 10)].tolist() == [12, 14, 11, 10, 13]


# ---- reasons ---------------------------------------------------------------------------------------------------
def test_every_item_has_reasons_with_correct_mutuals() -> None:
    world = World(seed=11, n=50, p=0.15)
    g = world.graph
    scorer = HeuristicScorer()
    items = 0
    for user in range(0, 50, 4):
        ranked = recommend(user, world.source, scorer, CandidateConfig(ann_k=5), NOW)
        explanations = list_relative_contributions(ranked.feature_matrix_of_items,
                                                   scorer.explain(ranked.feature_matrix_of_items))
        for item, row, explanation in zip(ranked.items, ranked.feature_matrix_of_items, explanations, strict=True):
            items += 1
            reasons = item.reasons
            json.dumps(reasons, allow_nan=False)
            v = item.candidate.user
            common = world.common(user, v)
            assert reasons["mutual_connections"] == len(common)
            assert reasons["mutual_examples"] == sorted(common, key=lambda z: (-g.degree(z), z))[:3]
            a, b = world.profiles.get(user), world.profiles.get(v)
            expected_shared = [name for name, same in (("company", profile_features.same_company_current),
                                                       ("school", profile_features.same_school),
                                                       ("industry", profile_features.same_industry)) if same(a, b)]
            assert reasons["shared"] == expected_shared
            assert reasons.get("similar_profile", False) == (ANN in item.sources)
            positive = sorted((float(c) for c in explanation if round(float(c), 4) > 0), reverse=True)[:3]
            assert [t["contribution"] for t in reasons["top_features"]] == [round(c, 4) for c in positive]
            assert reasons["text"]
            if common:
                parts = reasons["text"].split(" · ")
                assert f"{len(common)} mutual connection" in reasons["text"] or len(parts) == 3
            if "company" in expected_shared:
                assert f"both at {a.company}" in reasons["text"]
            assert np.array_equal(row, FeatureBuilder().matrix(
                user, CandidateSet.from_candidates(user, [item.candidate]), world.source, NOW)[0], equal_nan=True)
    assert items > 50


def test_a_feature_constant_across_the_list_or_about_the_query_alone_is_never_a_reason() -> None:
    rng = np.random.default_rng(5)
    rows = rng.random((20, N_FEATURES))
    rows[:, FEATURE_INDEX["same_industry"]] = 1.0  # every shown candidate shares the industry
    rows[:3, FEATURE_INDEX["geo_distance_km"]] = np.nan  # NaN on some rows only: varies
    contributions = rng.normal(0, 0.1, (20, N_FEATURES))
    # the largest raw contributions: a query-only column and the constant one (which still varies by row, as
    # Saabas values do along different paths)
    contributions[:, FEATURE_INDEX["query_days_since_last_connection"]] = 5.0 + rng.random(20)
    contributions[:, FEATURE_INDEX["same_industry"]] = 4.0 + rng.random(20)
    relative = list_relative_contributions(rows, contributions)
    assert np.isnan(relative[:, FEATURE_INDEX["query_days_since_last_connection"]]).all()
    assert np.isnan(relative[:, FEATURE_INDEX["same_industry"]]).all()
    assert not np.isnan(relative[:, FEATURE_INDEX["geo_distance_km"]]).any()
    column = FEATURE_INDEX["common_neighbor_count"]
    assert np.allclose(relative[:, column], contributions[:, column] - contributions[:, column].mean())
    world = World(seed=11, n=50, p=0.15)
    for i in range(20):
        reasons = build_reasons(0, 1, ("graph",), None, rows[i], relative[i], world.source, FeatureBuilder().profiles)
        named = {t["feature"] for t in reasons["top_features"]}
        assert not named & {"same_industry", *QUERY_ONLY_FEATURES}
        assert all(t["contribution"] > 0 for t in reasons["top_features"])
    one = list_relative_contributions(rows[:1], contributions[:1])  # a list of one: its own, query-only out
    assert one[0, FEATURE_INDEX["same_industry"]] == contributions[0, FEATURE_INDEX["same_industry"]]
    assert np.isnan(one[0, FEATURE_INDEX["query_days_since_last_connection"]])


def test_the_text_leads_with_the_strongest_candidate_specific_evidence() -> None:
    row = np.zeros(N_FEATURES)
    row[FEATURE_INDEX["common_neighbor_count"]] = 1
    row[FEATURE_INDEX["co_engaged_with_content"]] = 2
    reasons = {"mutual_connections": 1, "shared": []}
    relative = np.full(N_FEATURES, -np.inf)
    relative[FEATURE_INDEX["common_neighbor_count"]] = 0.01
    relative[FEATURE_INDEX["co_engaged_with_content"]] = 0.4
    assert reason_text(reasons, row, relative) == "engaged with the same posts · 1 mutual connection"
    assert reason_text(reasons, row) == "1 mutual connection · engaged with the same posts"  # no contributions
    busy = {"mutual_connections": 3, "shared": [], "active_recently": True}
    relative[FEATURE_INDEX["candidate_activity_7d"]] = 0.9
    assert reason_text(busy, row, relative).startswith("active lately · engaged with the same posts")
    relative[FEATURE_INDEX["candidate_activity_7d"]] = -0.2  # not what sets it apart: not said
    assert "active lately" not in reason_text(busy, row, relative)
    assert "active lately" not in reason_text(busy, row)


# ---- scorers -------------------------------------------------------------------------------------------------
def test_heuristic_is_an_additive_blend() -> None:
    scorer = HeuristicScorer()
    assert isinstance(scorer, Scorer) and scorer.version == "heuristic-v1"
    base = np.zeros((1, len(FEATURE_NAMES)))
    base[0, FEATURE_INDEX["profile_view_recency_days"]] = np.nan
    base[0, FEATURE_INDEX["geo_distance_km"]] = np.nan
    base[0, FEATURE_INDEX["gnn_embedding_cosine_sim"]] = np.nan
    assert scorer.predict(base)[0] == 0.0  # nothing known, nothing added; NaN contributes 0
    rows = np.repeat(base, 3, axis=0)
    rows[1, FEATURE_INDEX["adamic_adar_score"]] = 1.0
    rows[2, FEATURE_INDEX["adamic_adar_score"]] = 1.0
    rows[2, FEATURE_INDEX["same_company_current"]] = 1.0
    scores = scorer.predict(rows)
    assert scores[0] < scores[1] < scores[2]
    assert np.allclose(scorer.explain(rows).sum(axis=1), scores)


def _synthetic_rows(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.random((n, len(FEATURE_NAMES)))
    x[rng.random(n) < 0.3, FEATURE_INDEX["profile_view_recency_days"]] = np.nan
    logit = 3 * x[:, FEATURE_INDEX["adamic_adar_score"]] + 2 * x[:, FEATURE_INDEX["same_company_current"]] - 2.5
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int8)
    return x, y


def test_ranker_trains_predicts_explains_and_round_trips(tmp_path) -> None:
    x, y = _synthetic_rows(3000, seed=0)
    val_x, val_y = _synthetic_rows(800, seed=1)
    config = RankerConfig(n_estimators=40, max_depth=4, train_threads=1, early_stopping_rounds=10)
    ranker = Ranker.train(x, y, val_x, val_y, config, {"label_horizon": "14 days"})
    assert isinstance(ranker, Scorer)
    assert re.fullmatch(r"xgb-\d{14}-[0-9a-f]{8}", ranker.version)
    assert ranker.metadata["val_auc"] > 0.65
    assert ranker.metadata["feature_names"] == list(FEATURE_NAMES)
    assert ranker.metadata["training"]["rows"] == 3000 and ranker.metadata["training"]["val_rows"] == 800
    scores = ranker.predict(val_x)
    assert scores.shape == (800,) and np.all((scores > 0) & (scores < 1))
    margin = ranker.margin(val_x)
    for approximate in (False, True):
        contributions = ranker.contributions(val_x[:50], approximate=approximate)
        assert contributions.shape == (50, len(FEATURE_NAMES) + 1)
        assert np.allclose(contributions.sum(axis=1), margin[:50], atol=1e-4)
    importances = ranker.feature_importances()
    assert list(importances) == list(FEATURE_NAMES)
    assert max(importances, key=importances.get) == "adamic_adar_score"
    assert "adamic_adar_score" in ranker.describe()

    ranker.save(tmp_path / "model")
    loaded = Ranker.load(tmp_path / "model")
    assert loaded.version == ranker.version
    assert loaded.metadata == json.loads(json.dumps(ranker.metadata))
    assert np.array_equal(loaded.predict(val_x), scores)
    assert np.allclose(loaded.contributions(val_x[:5]), ranker.contributions(val_x[:5]))


def test_recommend_with_the_ranker_uses_its_contributions_for_reasons() -> None:
    world = World(seed=3, n=60, p=0.12)
    x, y = _synthetic_rows(1500, seed=2)
    ranker = Ranker.train(x, y, config=RankerConfig(n_estimators=20, max_depth=3, train_threads=1))
    for user in (0, 7, 21):
        ranked = recommend(user, world.source, ranker, CandidateConfig(ann_k=10), NOW)
        assert ranked.model_version == ranker.version
        assert len(ranked.items) == min(20, ranked.candidates_considered)
        assert np.allclose([item.score for item in ranked.items], ranker.predict(ranked.feature_matrix_of_items))
        explanations = list_relative_contributions(ranked.feature_matrix_of_items,
                                                   ranker.explain(ranked.feature_matrix_of_items))
        for item, explanation in zip(ranked.items, explanations, strict=True):
            ordered = np.argsort(-np.where(np.isnan(explanation), -np.inf, explanation), kind="stable")[:3]
            expected = [FEATURE_NAMES[i] for i in ordered if round(float(explanation[i]), 4) > 0]
            assert [t["feature"] for t in item.reasons["top_features"]] == expected
        assert set(ranked.timings) >= {"candidates", "features", "predict", "reasons", "total"}


def test_roc_auc_counts_pairs_and_ties() -> None:
    rng = np.random.default_rng(0)
    labels = rng.random(200) < 0.3
    scores = rng.integers(0, 10, 200).astype(float)  # many ties
    pairs = [(1.0 if s > t else 0.5 if s == t else 0.0) for s in scores[labels] for t in scores[~labels]]
    assert roc_auc(labels, scores) == pytest.approx(np.mean(pairs))
    assert math.isnan(roc_auc(np.ones(3, bool), np.arange(3.0)))


def test_features_of_items_are_named_and_nan_free() -> None:
    world = World(seed=4)
    ranked = recommend(0, world.source, HeuristicScorer(), CandidateConfig(), NOW)
    assert ranked.items
    features = ranked.features_of(0)
    assert list(features) == list(FEATURE_NAMES)
    assert features == feature_dict(ranked.feature_matrix_of_items[0])
    json.dumps(features, allow_nan=False)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_id_array_reads_equal_the_per_user_reads_through_mutations(seed: int) -> None:
    """MemorySource's columnar reads (IdArraySource) against the dict reads they replace, on random ids (known,
    unknown, negative, huge) while users, connections, removals and embeddings keep arriving after the sorted
    lookup was first built."""
    rng = np.random.default_rng(seed)
    source = MemorySource(dim=4)
    ts = NOW - 90 * DAY_MS

    def check() -> None:
        ids = rng.choice(np.array([*range(-3, 260), 2**40 + 7, -(2**40)], np.int64), size=200)
        id_list = ids.tolist()
        assert np.array_equal(source.degrees_of(ids), source.many_degrees(id_list))
        assert source.profiles_of(ids) == source.many_profiles(id_list)
        columnar, plain = source.activity_table_of(ids), source.activity_table(id_list)
        for a, b in zip(columnar, plain, strict=True):
            assert a.tobytes() == b.tobytes()
        assert source.embeddings_of(ids).tobytes() == source.embeddings(id_list).tobytes()

    check()  # an empty source
    for step in range(6):
        for _ in range(150):
            u, v = (int(x) for x in rng.integers(0, 200 + 10 * step, 2))
            ts += int(rng.integers(1, DAY_MS))
            if u == v:
                source.add_user(u)
            elif rng.random() < 0.2:
                source.remove_connection(u, v, ts)
            else:
                source.add_connection(u, v, ts if rng.random() < 0.9 else None)
        for user in rng.integers(0, 260, 20).tolist():
            source.set_embedding(user, None if rng.random() < 0.2 else rng.normal(size=4) + 0.1)
        check()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_profile_slots_by_id_array_equal_the_dict_lookup(seed: int) -> None:
    """ProfileCache.slots with the ids as an array (one binary search) against the dict lookup per user, on
    random user lists while profiles change, are copied, are removed and the cache resets."""
    world = World(seed)
    rng = np.random.default_rng(seed)
    by_array, by_dict = ProfileCache(max_users=60), ProfileCache(max_users=60)
    profiles = [p for p in world.profiles.values()]
    for step in range(30):
        users = rng.choice(np.array([*range(45), 10**12, -5], np.int64), size=int(rng.integers(1, 40))).tolist()
        ids = np.array(users, np.int64)
        got = by_array.slots(users, world.source, ids)
        expected = by_dict.slots(users, world.source)
        assert got.tolist() == expected.tolist()
        assert len(by_array) == len(by_dict) and by_array.parses == by_dict.parses
        user = int(rng.integers(0, 45))
        if step % 3 == 0:
            world.source.set_profile(user, profiles[int(rng.integers(len(profiles)))])
        elif step % 3 == 1 and user in world.source.profiles:
            world.source.profiles[user] = Profile(**world.source.profiles[user].to_dict())  # an equal copy
        else:
            world.source.profiles.pop(user, None)


def test_id_index_rows_equal_a_dict_lookup() -> None:
    """IdIndex.rows (sorted column, merges of new ids, the memo of the last answer) against a plain dict."""
    from pymk.ranking.id_index import IdIndex

    rng = np.random.default_rng(7)
    index, reference = IdIndex(), {}
    ids = rng.integers(-50, 500, 300)
    assert index.rows(ids).tolist() == [0] * 300
    for _ in range(40):
        for user in rng.integers(-50, 500, int(rng.integers(0, 20))).tolist():
            reference.setdefault(user, len(reference) + 1)
            assert index.add(user) == reference[user]
        if rng.random() < 0.5:
            ids = rng.integers(-50, 500, int(rng.integers(0, 300)))
        for _ in range(2):  # the same ids again: the memo must follow the adds in between
            rows = index.rows(ids)
            assert rows.tolist() == [reference.get(u, 0) for u in ids.tolist()]
            rows[:] = -1  # the caller's copy


_ID = st.integers(-(2**63), 2**63 - 1)


@settings(max_examples=300, deadline=None)
@given(values=st.lists(st.one_of(_ID, st.integers(-3, 12)), max_size=40),
       wanted=st.lists(st.one_of(_ID, st.integers(-3, 12)), max_size=12))
def test_ids_in_equals_numpy_isin(values: list[int], wanted: list[int]) -> None:
    """ids_in (a comparison pass per id for a few, else a sort and a binary search) gives np.isin's booleans:
    empty sides, duplicates, the 64-bit extremes, and a wanted array the caller says is sorted."""
    from pymk.ranking.id_index import ids_in

    values_array, wanted_array = np.array(values, np.int64), np.array(wanted, np.int64)
    expected = np.isin(values_array, wanted_array)
    assert ids_in(values_array, wanted_array).tolist() == expected.tolist()
    assert ids_in(values_array, np.sort(wanted_array), wanted_sorted=True).tolist() == expected.tolist()
    assert ids_in(values_array, np.empty(0)).tolist() == [False] * len(values)  # Stage 1's empty float arrays


@pytest.mark.parametrize(("seed", "hub_degree"), [(0, 0), (1, 0), (2, 0), (3, 12)])
def test_memory_two_hop_arrays_equal_the_dict_traversal_bit_for_bit(seed: int, hub_degree: int) -> None:
    """MemorySource's TwoHopArraySource against its dict traversal, through additions and removals (its kept
    per-user arrays must follow every change); with a hub degree, users crossing it both ways (a 60-user graph of
    ~600 additions has degrees around it), and no 2-path through a hub in either."""
    rng = np.random.default_rng(seed)
    source = MemorySource(dim=4, hub_degree=hub_degree)
    users = list(range(60))
    for step in range(600):
        u, v = (int(x) for x in rng.choice(users, 2, replace=False))
        if rng.random() < 0.8:
            source.add_connection(u, v, NOW - 1000 + step)
        else:
            source.remove_connection(u, v, NOW - 1000 + step)
        # every step a few users (the middle arrays kept per user must follow each change), now and then all
        for user in (users if step % 97 == 0 or step == 599 else [u, v, int(rng.choice(users))]):
            counts, scores = source.two_hop(user)
            allocation = dict(source.two_hop_resource_allocation(user))
            arrays = source.two_hop_arrays(user)
            ids = sorted(counts)
            assert arrays.ids.tolist() == ids
            assert arrays.counts.tolist() == [counts[i] for i in ids]
            assert arrays.adamic_adar.tobytes() == np.array([scores[i] for i in ids], np.float64).tobytes()
            assert arrays.resource_allocation.tobytes() == np.array([allocation[i] for i in ids]).tobytes()
            assert source.two_hop_resource_allocation(user) == allocation
            if hub_degree:  # the oracle: 2-paths through non-hubs only
                expected: dict[int, int] = defaultdict(int)
                for middle in source.neighbours(user):
                    if len(source.neighbours(middle)) <= hub_degree:
                        for other in source.neighbours(middle):
                            if other != user and other not in source.neighbours(user):
                                expected[other] += 1
                assert counts == expected
