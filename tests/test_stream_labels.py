"""Tier 1: delayed labels of impressions, in event time."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from pymk.events import Impression
from pymk.ranking.features import FEATURE_INDEX, FEATURE_NAMES
from pymk.ranking.recommend import sample_unshown
from pymk.ranking.stream_labels import (
    LabelledImpression,
    feature_matrix,
    label_impressions,
    pool_weights,
    recall_at_k,
    time_split,
)

DAY = 86_400_000
H = 14 * DAY


def shown(user: int, candidate: int, as_of: int, score: float = 0.5, **features: float | None) -> Impression:
    return Impression(user, candidate, 1, score, "m1", dict(features), ts=as_of + 5, as_of=as_of)


def outcomes(rows: list) -> dict[tuple[int, int], tuple[int, str]]:
    return {(r.impression.user, r.impression.candidate): (r.label, r.outcome) for r in rows}


def test_labels_follow_the_horizon_in_event_time() -> None:
    t = 1_000 * DAY
    impressions = [shown(1, 2, t), shown(1, 3, t), shown(1, 4, t), shown(1, 5, t), shown(1, 6, t), shown(7, 8, t)]
    connections = [(2, 1, "add", t + DAY),  # either direction
                   (1, 4, "add", t + H + 1),  # too late
                   (1, 6, "add", t - DAY)]  # before it was shown
    dismissals = [(1, 3, t + 2 * DAY), (8, 7, t + DAY)]  # (8 dismissed 7: not the shown direction)
    rows = label_impressions(impressions, connections, dismissals, H, event_time_ms=t + H + 10)
    assert outcomes(rows) == {(1, 2): (1, "connected"), (1, 3): (0, "dismissed"), (1, 4): (0, "expired"),
                              (1, 5): (0, "expired"), (1, 6): (0, "expired"), (7, 8): (0, "expired")}


def test_open_windows_stay_unlabelled_and_a_pair_counts_once_from_its_deciding_impression() -> None:
    t = 1_000 * DAY
    impressions = [shown(1, 2, t + 3 * DAY), shown(1, 2, t), shown(1, 9, t + 10 * DAY)]
    rows = label_impressions(impressions, [(1, 2, "add", t + H - DAY)], [], H, event_time_ms=t + H)
    assert outcomes(rows) == {(1, 2): (1, "connected")}  # (1, 9)'s window is still open
    assert rows[0].impression.as_of == t + 3 * DAY  # the latest impression before the connection
    # a connection after the first impression's window but inside a later one's counts, from the later one
    late = label_impressions(impressions, [(1, 2, "add", t + H + DAY)], [], H, event_time_ms=t + 3 * H)
    assert outcomes(late)[(1, 2)] == (1, "connected")
    # no connection at all: one negative, from the latest impression whose window has passed
    none = label_impressions(impressions, [], [], H, event_time_ms=t + H + 2 * DAY)
    assert outcomes(none)[(1, 2)] == (0, "expired") and none[0].impression.as_of == t


def test_connection_before_a_dismissal_wins() -> None:
    t = 50 * DAY
    rows = label_impressions([shown(1, 2, t)], [(1, 2, "add", t + DAY)], [(1, 2, t + 2 * DAY)], H, t + H)
    assert outcomes(rows) == {(1, 2): (1, "connected")}


def test_logged_features_become_the_matrix_and_the_split_is_by_time() -> None:
    t = 10 * DAY
    rows = label_impressions([shown(1, 2, t, common_neighbor_count=3.0, geo_distance_km=None),
                              shown(1, 3, t + DAY, common_neighbor_count=1.0)], [], [], H, 100 * DAY)
    matrix = feature_matrix(rows)
    assert matrix.shape == (2, len(FEATURE_NAMES))
    assert matrix[0, FEATURE_INDEX["common_neighbor_count"]] == 3.0
    assert math.isnan(matrix[0, FEATURE_INDEX["geo_distance_km"]])
    train, val = time_split(rows, 0.5)
    assert train.tolist() == [True, False] and val.tolist() == [False, True]


def test_recall_at_k_over_the_users_with_a_connection() -> None:
    t = 10 * DAY
    impressions = [shown(1, c, t) for c in (2, 3, 4)] + [shown(5, 6, t)]
    rows = label_impressions(impressions, [(1, 3, "add", t + 1), (1, 4, "add", t + 2)], [], H, t + H)
    by_pair = {(r.impression.user, r.impression.candidate): i for i, r in enumerate(rows)}
    scores = np.zeros(len(rows))
    scores[by_pair[(1, 3)]] = 1.0
    assert recall_at_k(rows, scores, k=1) == 0.5  # user 5 has no connection: not averaged
    assert recall_at_k(rows, scores, k=3) == 1.0


def test_impression_json_is_the_dataclass_as_a_dict() -> None:
    import json
    from dataclasses import asdict

    impression = Impression(3, 9, 0, 0.25, "xgb-x", {"adamic_adar_score": 1.5, "geo_distance_km": None}, ts=7,
                            as_of=5, sources=("graph", "ann"), weight=12.5)
    expected = {**asdict(impression), "sources": ["graph", "ann"]}
    assert impression.to_json() == json.dumps(expected, separators=(",", ":"), allow_nan=False).encode()
    assert Impression.from_json(impression.to_json()) == impression


def test_unshown_sample_is_stratified_below_the_list_and_weighted_by_what_it_stands_for() -> None:
    scores = np.linspace(1.0, 0.0, 1000)[np.random.default_rng(0).permutation(1000)]
    order = np.argsort(-scores)
    top = order[:20]
    picked = sample_unshown(top, scores, k=20, near_ranks=100, rng=np.random.default_rng(1))
    ranks = {int(index): rank for rank, index in enumerate(order.tolist(), start=1)}
    assert len(picked) == 20 and len({i for i, _ in picked}) == 20 and not {i for i, _ in picked} & set(top.tolist())
    near = [(i, w) for i, w in picked if ranks[i] <= 100]
    far = [(i, w) for i, w in picked if ranks[i] > 100]
    assert len(near) == len(far) == 10
    assert all(w == 80 / 10 for _, w in near) and all(w == 900 / 10 for _, w in far)
    assert sum(w for _, w in picked) == 1000 - 20  # the weighted sample stands for the whole unshown pool
    # a small pool: every unshown candidate once, weight 1; the same seed picks the same rows (a redone flush)
    small = sample_unshown(top[:5], scores, k=2000, near_ranks=100,
                           rng=np.random.default_rng(1))
    assert len(small) == 995 and {w for _, w in small} == {1.0}
    assert picked == sample_unshown(top, scores, k=20, near_ranks=100, rng=np.random.default_rng(1))
    assert sample_unshown(top, scores, k=0, near_ranks=100, rng=np.random.default_rng(1)) == []


def test_pool_weights_correct_the_mix_within_a_class_and_keep_the_class_balance() -> None:
    rows = [LabelledImpression(shown(1, 2, 0), 0, "expired"),
            LabelledImpression(replace(shown(1, 3, 0), rank=0, weight=9.0), 0, "expired"),
            LabelledImpression(shown(1, 4, 0), 1, "connected"),
            LabelledImpression(replace(shown(1, 5, 0), rank=0, weight=3.0), 1, "connected")]
    weights = pool_weights(rows)
    assert weights[1] == 9 * weights[0] and weights[3] == 3 * weights[2]
    assert math.isclose(weights[:2].sum(), 2) and math.isclose(weights[2:].sum(), 2)


def test_a_lists_unshown_sample_is_one_record_and_reads_back_as_its_impressions() -> None:
    from pymk.events import unshown_sample_from_json, unshown_sample_to_json

    sample = [Impression(3, c, 0, 0.1 * c, "xgb-x", {"adamic_adar_score": float(c), "geo_distance_km": None},
                         ts=70, as_of=50, sources=("ann",) if c % 2 else ("graph",), weight=8.0 + c)
              for c in (4, 9, 11)]
    assert unshown_sample_from_json(unshown_sample_to_json(sample)) == sample
