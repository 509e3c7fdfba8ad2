"""The ranker's floor (a reference heuristic blended in, or fallen back to, when validation says the trees lose to
it) and early stopping on the validation lists' Recall@20."""

from __future__ import annotations

import numpy as np
import pytest

from pymk.paths import bundled_data
from pymk.ranking.features import FEATURE_INDEX, N_FEATURES
from pymk.ranking.heuristic import REFERENCE_HEURISTIC_COLUMNS
from pymk.ranking.model import HeuristicFloor, Ranker, RankerConfig
from pymk.ranking.training_data import RankingCase, ValidationLists, choose_floor

RA = FEATURE_INDEX["resource_allocation_score"]
SMALL = RankerConfig(n_estimators=40, max_depth=3, train_threads=1, early_stopping_rounds=None)


def lists_led_by(column: int, queries: int, seed: int, noise: float = 0.0) -> ValidationLists:
    """Validation lists whose future partners are the top 3 of ``column`` (plus noise): that heuristic wins."""
    rng = np.random.default_rng(seed)
    cases = []
    for query in range(queries):
        features = rng.random((60, N_FEATURES)).astype(np.float32)
        signal = features[:, column] + noise * rng.random(60)
        positive = np.zeros(60, bool)
        positive[np.argsort(-signal)[:3]] = True
        cases.append(RankingCase(query, np.arange(60, dtype=np.int64) + 1000 * query, features, positive, 3))
    return ValidationLists(cases, 20)


def noise_ranker(seed: int = 0) -> tuple[Ranker, np.ndarray, np.ndarray]:
    """Trees fitted to labels that nothing predicts: they rank no better than chance."""
    rng = np.random.default_rng(seed)
    x = rng.random((400, N_FEATURES)).astype(np.float32)
    y = (rng.random(400) < 0.3).astype(np.int8)
    return Ranker.train(x, y, config=SMALL), x, y


def test_the_floor_falls_back_to_the_heuristic_validation_says_beats_the_trees(tmp_path) -> None:
    ranker, x, y = noise_ranker()
    lists = lists_led_by(RA, queries=60, seed=1)
    floor, evidence = choose_floor(ranker, lists, x, y)
    assert floor is not None and floor.heuristic == "RA" and floor.column == REFERENCE_HEURISTIC_COLUMNS["RA"]
    # RA finds every partner of these lists: no blend can beat it, so the heuristic serves alone.
    assert floor.weight is None and evidence["decision"].startswith("fallback")
    assert evidence["val_recall_at_20_heuristics"]["RA"] == pytest.approx(1.0)
    served = ranker.with_floor(floor, evidence)
    assert served.version.endswith("-fallback-RA") and served.metadata["floor_decision"] == "fallback"
    # Served, it orders every list exactly as RA does, and keeps doing so once saved and loaded.
    assert lists(served.predict(lists.features)) == pytest.approx(1.0)
    loaded = Ranker.load(served.save(tmp_path / "ranker"))
    assert loaded.floor == floor and loaded.version == served.version
    np.testing.assert_array_equal(loaded.predict(lists.features), served.predict(lists.features))
    # Reasons still add up to the served margin, all of it RA's.
    contributions = loaded.contributions(lists.features[:20], approximate=True)
    np.testing.assert_allclose(contributions.sum(axis=1), loaded.margin(lists.features[:20]), rtol=1e-5)
    assert np.count_nonzero(contributions[:, RA]) > 0
    assert np.count_nonzero(np.delete(contributions, RA, axis=1)) == 0


def test_no_floor_when_validation_cannot_tell_the_trees_from_the_heuristic() -> None:
    ranker, x, y = noise_ranker()
    # The partners are nearly random: RA's lead over chance-level trees is within the noise of 8 lists. (The best
    # of four heuristics on 8 random lists is sometimes 2 standard errors ahead by chance: with the 34 columns,
    # seed 2 draws such lists, AA ahead by 0.375 ± 0.076; seed 3 draws lists where no lead is significant.)
    lists = lists_led_by(RA, queries=8, seed=3, noise=50.0)
    floor, evidence = choose_floor(ranker, lists, x, y)
    assert floor is None and evidence["decision"].startswith("model")
    assert ranker.with_floor(None, evidence).version == ranker.version


def test_a_blend_adds_the_weighted_heuristic_to_the_trees_margin() -> None:
    ranker, x, _ = noise_ranker()
    floor = HeuristicFloor("RA", "resource_allocation_score", scale=0.5, weight=2.0)
    blended = ranker.with_floor(floor)
    expected = ranker.margin(x).astype(np.float64) + 2.0 * np.log1p(x[:, RA].astype(np.float64) / 0.5)
    np.testing.assert_allclose(blended.margin(x), expected, rtol=1e-5)
    contributions = blended.contributions(x[:10], approximate=True)
    np.testing.assert_allclose(contributions.sum(axis=1), blended.margin(x[:10]), rtol=1e-4, atol=1e-5)
    assert blended.version.endswith("-blend-RA") and blended.metadata["trees_version"] == ranker.version
    assert blended.with_floor(None).version == ranker.version  # the suffix is never stacked


def test_early_stopping_on_the_lists_keeps_the_trees_of_the_best_recall() -> None:
    rng = np.random.default_rng(3)
    x = rng.random((3000, N_FEATURES)).astype(np.float32)
    y = (x[:, RA] + 0.3 * rng.random(3000) > 0.9).astype(np.int8)
    lists = lists_led_by(RA, queries=30, seed=4, noise=0.3)
    config = RankerConfig(n_estimators=60, max_depth=3, train_threads=1, early_stopping_rounds=20,
                          list_metric_every=5, stop_on="recall@20")
    ranker = Ranker.train(x[:2400], y[:2400], x[2400:], y[2400:], config, list_metric=lists)
    curve = ranker.metadata["val_list_metric_curve"]
    best_rounds, best = max(curve, key=lambda point: (point[1], -point[0]))
    assert ranker.metadata["trees"] == best_rounds and ranker.metadata["stopped_on"] == "list metric"
    assert lists(ranker.margin(lists.features)) == pytest.approx(best, abs=1e-6)  # the kept trees score it
    with pytest.raises(ValueError):
        RankerConfig(stop_on="logloss")


def test_incremental_lists_take_no_threshold_shortcut_for_a_floored_ranker() -> None:
    # a floor reads its heuristic's column continuously: a row whose as-of columns stayed within their bins may
    # still have moved, so kept lists re-score such rows at every update
    from pymk.ranking.incremental import split_points

    ranker = Ranker.load(bundled_data("models/ranker"))
    assert split_points(ranker, N_FEATURES) is not None
    floored = ranker.with_floor(HeuristicFloor("popularity", "candidate_activity_7d", 1.0, 0.5))
    assert split_points(floored, N_FEATURES) is None
