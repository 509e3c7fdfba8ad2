"""Tier 1: the evaluation protocol (splits, heuristics, metrics, leakage guard, reports) and the reference table."""

from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path

import pytest

from conftest import BUNDLED_DATA
from pymk.datasets import EdgeHistory
from pymk.ranking.evaluation import (
    REFERENCE_RECALL_AT_20,
    REFERENCE_TOLERANCE,
    AdamicAdar,
    CommonNeighbours,
    EvaluationResult,
    EvaluationSplit,
    LeakageError,
    Method,
    MethodScores,
    Popularity,
    ResourceAllocation,
    assert_no_leakage,
    coverage,
    evaluate_methods,
    evaluate_path,
    make_split,
    split_connections,
    two_hop_candidates,
    write_report,
)

# The hand-made graph. Past (12 edges, ts 1..12); past degrees:
#   0:2  1:3  2:2  3:2  4:3  5:1  6:2  7:3  8:1  9:1  10:2  11:1  12:1
PAST_EDGES = [(0, 1), (0, 2), (1, 3), (2, 3), (1, 4), (4, 5), (4, 6), (7, 8), (7, 9), (6, 7), (10, 11), (10, 12)]
# Future (4 edges, so floor(0.8 * 16) = 12 are the past): two warm pairs, one with a new user, one all-new pair.
FUTURE_EDGES = [(0, 3), (5, 7), (3, 30), (40, 41)]


def tiny_history() -> EdgeHistory:
    connections = [(u, v, step) for step, (u, v) in enumerate(PAST_EDGES + FUTURE_EDGES, start=1)]
    return EdgeHistory("tiny.txt", True, connections, [], 0, len(connections))


@pytest.fixture
def tiny_split() -> EvaluationSplit:
    return make_split(tiny_history(), "time")


def test_time_split_sizes_query_users_and_cold_start(tiny_split: EvaluationSplit) -> None:
    assert [(u, v) for u, v, _ in tiny_split.past_connections] == PAST_EDGES
    assert tiny_split.future_pairs == FUTURE_EDGES
    assert set(tiny_split.past_users) == set(range(13))
    # (3, 30) and (40, 41) have an endpoint unseen in the past: counted apart, not query pairs
    assert tiny_split.cold_start_pairs == 2 and tiny_split.cold_start_pairs_both_new == 1
    assert tiny_split.query_users == [0, 3, 5, 7]
    assert tiny_split.future_neighbours == {0: {3}, 3: {0}, 5: {7}, 7: {5}}
    assert tiny_split.past_degree[1] == 3 and tiny_split.past_degree[5] == 1
    sizes = tiny_split.sizes()
    assert sizes["past_connections"] == 12 and sizes["future_connections"] == 4
    assert sizes["evaluated_user_pairs"] == 4


def test_a_hub_degree_drops_the_2_paths_through_hubs_from_the_heuristics(tiny_split: EvaluationSplit) -> None:
    """PYMK_HUB_DEGREE in the evaluation: with hubs above degree 2 (users 1, 4 and 7), CN counts only the paths
    through users of at most 2 past connections, as the product's sources do under the same cap."""
    capped = CommonNeighbours(tiny_split, hub_degree=2)
    assert capped.scores(0) == {3: 1.0}  # via 2 only: the path 0-1-3 and 0-1-4 run through the hub 1
    assert capped.candidates(5) == set()  # 5's one neighbour, 4, is a hub
    assert CommonNeighbours(tiny_split).scores(0) == {3: 2.0, 4: 1.0}  # no cap: as before
    assert Popularity(tiny_split, hub_degree=2).rank(0, 3) == Popularity(tiny_split).rank(0, 3)


def test_time_split_orders_ties_by_smaller_then_larger_id_and_cuts_at_floor() -> None:
    connections = [(5, 9, 100), (7, 2, 100), (2, 6, 100), (1, 3, 50), (4, 8, 200), (3, 4, 300), (1, 9, 300)]
    past, future = split_connections(connections, "time")
    assert len(past) == math.floor(0.8 * 7) == 5
    assert past == [(1, 3, 50), (2, 6, 100), (2, 7, 100), (5, 9, 100), (4, 8, 200)]
    assert future == [(1, 9, 300), (3, 4, 300)]


def test_random_split_is_python_random_shuffle_of_the_load_order() -> None:
    connections = [(u, u + 1 + u % 3, 1000 * u) for u in range(23)]
    past, future = split_connections(connections, "random", seed=0)
    shuffled = [(u, v) for u, v, _ in connections]
    random.Random(0).shuffle(shuffled)
    assert {(u, v) for u, v, _ in past} == set(shuffled[:18])  # floor(0.8 * 23) = 18
    assert {(u, v) for u, v, _ in future} == set(shuffled[18:])
    # each side stays in time order, so the lead can replay the past as a stream
    assert [ts for _, _, ts in past] == sorted(ts for _, _, ts in past)
    other_past, _ = split_connections(connections, "random", seed=1)
    assert other_past != past
    with pytest.raises(ValueError):
        split_connections(connections, "sideways")  # type: ignore[arg-type]


def test_common_neighbours_ranking_and_tie_rule(tiny_split: EvaluationSplit) -> None:
    method = CommonNeighbours(tiny_split)
    # 3 has two common neighbours, 4 one; then score 0 in popularity order: degree 3 (7), degree 2 by id
    # (6, 10), degree 1 by id (5, 8, 9, 11, 12). The user and its neighbours 1, 2 never appear.
    assert method.rank(0, 20) == [3, 4, 7, 6, 10, 5, 8, 9, 11, 12]
    assert method.rank(0, 3) == [3, 4, 7]
    # equal scores (1 and 6 both share neighbour 4): higher degree first
    assert method.rank(5, 4) == [1, 6, 7, 0]
    assert method.scores(0) == {3: 2.0, 4: 1.0}
    assert method.candidates(7) == {4}


def test_adamic_adar_resource_allocation_and_popularity_by_hand(tiny_split: EvaluationSplit) -> None:
    adamic_adar = AdamicAdar(tiny_split)
    expected = {3: 1 / math.log(3) + 1 / math.log(2), 4: 1 / math.log(3)}
    assert adamic_adar.scores(0) == pytest.approx(expected)
    # a degree-1 neighbour contributes 0 (and no division by ln 1 = 0)
    assert adamic_adar.weights is not None and adamic_adar.weights[tiny_split.arrays.index_of[5]] == 0.0
    resource_allocation = ResourceAllocation(tiny_split)
    assert resource_allocation.scores(0) == pytest.approx({3: 1 / 3 + 1 / 2, 4: 1 / 3})
    assert resource_allocation.rank(0, 2) == [3, 4]
    popularity = Popularity(tiny_split)
    # by past degree: 1, 4, 7 have degree 3; the user's neighbours 8, 9, 6 are excluded
    assert popularity.rank(7, 6) == [1, 4, 0, 2, 3, 10]
    assert popularity.rank(0, 4) == [4, 7, 3, 6]


def test_recall_mrr_and_curve_by_hand(tiny_split: EvaluationSplit) -> None:
    # CN ranks each future neighbour at: user 0 -> 3 at 1, user 3 -> 0 at 1, user 5 -> 7 at 3,
    # user 7 -> 5 at 7 (score 0: after 4, then popularity 1, 0, 2, 3, 10, 5)
    result = evaluate_methods(tiny_split, [CommonNeighbours(tiny_split)], ks=(1, 3), curve_max_k=10)
    scores = result.method("CN")
    assert scores.query_users == 4
    assert scores.recall == pytest.approx({1: 0.5, 3: 0.75})
    assert scores.recall_curve == pytest.approx([0.5, 0.5, 0.75, 0.75, 0.75, 0.75, 1.0, 1.0, 1.0, 1.0])
    assert scores.mrr == pytest.approx((1 + 1 + 1 / 3 + 1 / 7) / 4)
    # 7 is not 2 hops from 5, nor 5 from 7: the graph covers 2 of the 4 (query user, future neighbour) pairs
    assert result.coverage == {"graph": 0.5}
    assert scores.coverage == 0.5
    # a limited MRR depth gives reciprocal rank 0 to users whose first hit is deeper
    shallow = evaluate_methods(tiny_split, [CommonNeighbours(tiny_split)], ks=(1,), curve_max_k=10, mrr_depth=3)
    assert shallow.method("CN").mrr == pytest.approx((1 + 1 + 1 / 3) / 4)


class FixedRanking:
    """A product-like method: only the protocol's rank(user, k); no best_rank, no candidates."""

    name = "fixed"

    def __init__(self, rankings: dict[int, list[int]]) -> None:
        self.rankings = rankings
        self.calls: list[tuple[int, int]] = []

    def rank(self, user: int, k: int) -> list[int]:
        self.calls.append((user, k))
        return self.rankings.get(user, [])[:k]


def test_a_method_with_only_rank_is_scored_by_the_same_rules(tiny_split: EvaluationSplit) -> None:
    method = FixedRanking({0: [4, 3], 3: [4], 5: [7]})
    assert isinstance(method, Method)
    result = evaluate_methods(tiny_split, [method], ks=(1, 2), curve_max_k=5)
    scores = result.method("fixed")
    assert scores.recall == pytest.approx({1: 0.25, 2: 0.5})  # 5 hits at 1, 0 at 2; 3 and 7 never
    assert scores.mrr == pytest.approx((1 / 2 + 0 + 1 + 0) / 4)
    assert scores.coverage is None
    # users without a hit in the top list are asked for the full ranking (every past user) for MRR
    assert (3, len(tiny_split.past_users)) in method.calls


def test_best_rank_equals_the_position_in_the_full_ranking(tiny_split: EvaluationSplit) -> None:
    full_depth = len(tiny_split.past_users)
    for method in (CommonNeighbours(tiny_split), AdamicAdar(tiny_split), Popularity(tiny_split)):
        for user in tiny_split.past_users:
            full = method.rank(user, full_depth)
            assert len(full) == len(set(full)) == full_depth - 1 - tiny_split.past_degree[user]
            assert user not in full and not set(full) & tiny_split.past_adjacency[user]
            for target in full:
                assert method.best_rank(user, [target]) == full.index(target) + 1
            assert method.best_rank(user, tiny_split.past_adjacency[user]) is None


def test_coverage_takes_candidate_set_callables(tiny_split: EvaluationSplit) -> None:
    two_hop = two_hop_candidates(tiny_split)
    assert two_hop(0) == {3, 4} and two_hop(7) == {4}
    fractions = coverage(tiny_split, {"graph": two_hop, "everyone": lambda user: set(range(13)), "none": lambda _: ()})
    assert fractions == {"graph": 0.5, "everyone": 1.0, "none": 0.0}


def test_leakage_guard_accepts_the_split_and_raises_on_crafted_leaks(tiny_split: EvaluationSplit) -> None:
    assert_no_leakage(tiny_split)
    with pytest.raises(LeakageError, match="in the past graph"):  # a future pair that is also a past pair
        assert_no_leakage(dataclasses.replace(tiny_split, future_connections=[*tiny_split.future_connections,
                                                                               (0, 1, 99)]))
    leaked_adjacency = dict(tiny_split.past_adjacency)
    leaked_adjacency[0] = leaked_adjacency[0] | {3}
    leaked_adjacency[3] = leaked_adjacency[3] | {0}
    with pytest.raises(LeakageError):  # the future edge (0, 3) slipped into the graph methods see
        assert_no_leakage(dataclasses.replace(tiny_split, past_adjacency=leaked_adjacency))
    early_future = [(0, 3, 0), *tiny_split.future_connections[1:]]
    with pytest.raises(LeakageError, match="later than a future"):
        assert_no_leakage(dataclasses.replace(tiny_split, future_connections=early_future))
    # a random split has no time order to respect
    assert_no_leakage(dataclasses.replace(tiny_split, kind="random", future_connections=early_future))


def test_random_split_on_the_tiny_graph_has_no_leak() -> None:
    split = make_split(tiny_history(), "random", seed=0)
    assert len(split.past_connections) == 12 and len(split.future_connections) == 4
    assert split.kind == "random" and split.seed == 0
    assert not {(u, v) for u, v, _ in split.future_connections} & {(u, v) for u, v, _ in split.past_connections}


@pytest.fixture(scope="module")
def collegemsg_result() -> EvaluationResult:
    return evaluate_path(BUNDLED_DATA / "collegemsg" / "CollegeMsg.txt", "time")


def test_reference_recall_at_20_on_collegemsg(collegemsg_result: EvaluationResult) -> None:
    expected = REFERENCE_RECALL_AT_20["CollegeMsg.txt"]
    assert expected["split"] == "time"
    for name in ("CN", "AA", "RA", "popularity"):
        measured = collegemsg_result.method(name).recall[20]
        assert abs(measured - float(expected[name])) <= REFERENCE_TOLERANCE, (name, measured, expected[name])
    rows = collegemsg_result.reference()
    assert set(rows) == {"CN", "AA", "RA", "popularity"}
    assert all(row["within_tolerance"] is True for row in rows.values())
    sizes = collegemsg_result.sizes
    assert sizes["past_connections"] == math.floor(0.8 * sizes["connections"])
    assert sizes["query_users"] > 0 and sizes["cold_start_pairs"] > 0


def test_write_report_json_markdown_and_png(collegemsg_result: EvaluationResult, tmp_path: Path) -> None:
    out_json, out_md, out_png = tmp_path / "r.json", tmp_path / "r.md", tmp_path / "r.png"
    write_report(collegemsg_result, out_json, out_md, out_png)
    report = json.loads(out_json.read_text())
    assert report["split"] == "time" and report["data_path"].endswith("CollegeMsg.txt")
    assert "Query users" in report["protocol"]
    assert {row["name"] for row in report["methods"]} == {"CN", "AA", "RA", "popularity"}
    assert len(report["methods"][0]["recall_curve"]) == 100
    assert report["reference_recall_at_20"]["RA"]["reference"] == 0.0536
    assert report["coverage"]["graph"] > 0 and "load" in report["timings_seconds"]
    markdown = out_md.read_text()
    assert "| RA |" in markdown and "Recall@20" in markdown and "| graph |" in markdown
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_report_says_whether_the_product_meets_the_quality_goal(
        collegemsg_result: EvaluationResult, tmp_path: Path) -> None:
    def scores(name: str, recall_at_20: float) -> MethodScores:
        return MethodScores(name, {20: recall_at_20, 50: recall_at_20}, 0.1, 10, [recall_at_20], 0.0)

    result = dataclasses.replace(collegemsg_result, methods=[  # time split: the goal is +15 %
        *collegemsg_result.methods, scores("hybrid+XGBoost", 0.0800), scores("hybrid+XGBoost (live)", 0.0900)],
        coverage={**collegemsg_result.coverage, "hybrid": 0.75})
    goal = result.quality_goal()
    assert goal is not None and goal["best_heuristic"] == "popularity" and goal["goal_relative_lift"] == 0.15
    offline, live = goal["products"]["hybrid+XGBoost"], goal["products"]["hybrid+XGBoost (live)"]
    popularity = result.method("popularity").recall[20]  # 0.0710
    assert math.isclose(offline["relative_lift"], 0.0800 / popularity - 1) and not offline["met"]  # +12.7 %
    assert math.isclose(live["relative_lift"], 0.0900 / popularity - 1) and live["met"]  # +26.8 %
    assert math.isclose(goal["future_pairs_outside_hybrid_candidates"], 0.25)
    write_report(result, tmp_path / "r.json", tmp_path / "r.md")
    assert json.loads((tmp_path / "r.json").read_text())["quality_goal"]["products"]["hybrid+XGBoost"]["met"] is False
    markdown = (tmp_path / "r.md").read_text()
    assert f"hybrid+XGBoost 0.0800, {0.0800 / popularity - 1:+.1%}: **missed**" in markdown
    assert f"(live) 0.0900, {0.0900 / popularity - 1:+.1%}: met" in markdown
    assert collegemsg_result.quality_goal() is None  # heuristics alone: nothing to judge
