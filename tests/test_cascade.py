"""The cascade (ranking/cascade.py): which rows the pre-ranker passes, how the list's scores are composed, the gate on
the validation lists, and the model that carries it through save, load and a floor."""

from __future__ import annotations

import numpy as np
import pytest

from pymk.ranking.cascade import (
    CascadeConfig,
    ListSample,
    Prefilter,
    attach_cascade,
    compose,
    list_scores,
    passed_rows,
)
from pymk.ranking.features import FEATURE_INDEX, N_FEATURES
from pymk.ranking.model import HeuristicFloor, Ranker, RankerConfig
from pymk.ranking.recommend import ranking_order

_DEGREE = FEATURE_INDEX["candidate_degree_log"]


def rows(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.random((n, N_FEATURES)) * 5
    x[:, 0] = rng.integers(0, 30, n)  # common neighbours: what the labels follow
    return x


@pytest.fixture(scope="module")
def ranker() -> Ranker:
    x = rows(4000, 0)
    y = (x[:, 0] + np.random.default_rng(1).normal(0, 4, len(x)) > 20).astype(np.int8)
    return Ranker.train(x, y, config=RankerConfig(n_estimators=60, max_depth=4, early_stopping_rounds=None))


def lists_of(n_lists: int, n: int, seed: int) -> list[ListSample]:
    out = []
    for i in range(n_lists):
        x = rows(n, seed + i)
        out.append(ListSample(x, np.random.default_rng(seed + i).permutation(10 * n)[:n].astype(np.int64),
                              x[:, _DEGREE]))
    return out


def test_the_passed_rows_are_the_highest_margins_ties_to_the_lower_id() -> None:
    pre = np.array([0.5, 0.9, 0.5, 0.1, 0.5, 0.7], np.float32)
    ids = np.array([60, 10, 40, 30, 20, 50], np.int64)
    # 0.9 and 0.7 pass, then of the three tied at 0.5 the two lowest ids (20 at row 4, 40 at row 2)
    assert passed_rows(pre, ids, 4).tolist() == [1, 2, 4, 5]
    assert passed_rows(pre, ids, 6).tolist() == list(range(6))
    assert passed_rows(pre, ids, 10).tolist() == list(range(6))
    # the choice does not depend on the rows' order
    order = np.array([5, 3, 1, 0, 4, 2])
    assert sorted(ids[order][passed_rows(pre[order], ids[order], 4)].tolist()) == sorted(ids[[1, 2, 4, 5]].tolist())


def test_composed_scores_keep_the_passed_rows_above_in_the_full_models_order_and_the_rest_in_the_pre_rankers() -> None:
    rng = np.random.default_rng(3)
    pre = rng.normal(size=50).astype(np.float32)
    ids = np.arange(50, dtype=np.int64)
    passed = passed_rows(pre, ids, 12)
    full = np.full(50, np.nan)
    full[passed] = rng.random(12) * 0.3 + 0.01
    scores = compose(full, pre, passed)
    others = np.setdiff1d(np.arange(50), passed)
    assert np.array_equal(scores[passed], full[passed])  # bit for bit
    assert scores[others].max() < scores[passed].min()
    by_pre = others[np.argsort(-pre[others], kind="stable")]
    assert np.all(np.diff(scores[by_pre]) <= 0)  # the unpassed rows in the pre-ranker's order
    assert np.all(scores[others] > 0)  # still probability-like
    # every row passed (a short list): the full scores as they are
    assert np.array_equal(compose(full[passed], pre[passed], np.arange(12)), full[passed])


def test_list_scores_are_the_full_models_for_a_list_no_longer_than_m(ranker: Ranker) -> None:
    fitted = Prefilter.fit(ranker.margin, rows(3000, 5), CascadeConfig(trees=10, max_depth=3))
    cascade = ranker.with_prefilter(Prefilter(fitted.booster, 40), {"decision": "on"})
    x = rows(40, 9)
    scores, pre = list_scores(cascade, x, np.arange(40, dtype=np.int64))
    assert pre is None and np.array_equal(scores, np.asarray(ranker.predict(x), np.float64))
    x = rows(300, 10)
    scores, pre = list_scores(cascade, x, np.arange(300, dtype=np.int64))
    assert pre is not None
    passed = passed_rows(pre, np.arange(300), 40)
    assert np.array_equal(scores[passed], np.asarray(ranker.predict(x[passed]), np.float64))
    top = ranking_order(scores, x[:, _DEGREE], np.arange(300), 20)
    assert set(top.tolist()) <= set(passed.tolist())


def test_the_cascade_is_attached_only_where_the_validation_lists_hold(ranker: Ranker) -> None:
    train = rows(6000, 20)
    validation = lists_of(40, 400, 100)
    attached, evidence = attach_cascade(ranker, train, validation, CascadeConfig(candidates=(150,)))
    assert evidence["decision"] == "on" and evidence["top20_equal_share"] >= 0.99
    assert attached.prefilter is not None and attached.version == f"{ranker.version}-cascade150"
    assert attached.metadata["cascade"]["lists_longer_than_m"] == 40
    # a pre-ranker of one stump that must pass only 20 rows: it cannot keep the top 20, so none is attached
    kept, evidence = attach_cascade(ranker, train, validation, CascadeConfig(candidates=(20,), trees=1, max_depth=1))
    assert evidence["decision"] == "off" and evidence["top20_equal_share"] < 0.99
    assert kept.prefilter is None and kept.version == ranker.version
    assert kept.metadata["cascade"]["decision"] == "off"
    # several choices: the smallest M that holds
    chosen, evidence = attach_cascade(ranker, train, validation, CascadeConfig(candidates=(20, 60, 150, 399)))
    # judged on the share less two standard errors: a few hundred lists measure it only so well
    bound = {int(m): b for m, b in evidence["lower_bound_by_m"].items()}
    assert evidence["decision"] == "on"
    assert chosen.prefilter.candidates == evidence["candidates"] == min(m for m, b in bound.items() if b >= 0.99)
    for m, b in bound.items():
        share, lists = evidence["top20_equal_share_by_m"][str(m)], evidence["lists_by_m"][str(m)]
        assert b == pytest.approx(share - 2 * np.sqrt(share * (1 - share) / lists))
    with pytest.raises(ValueError):
        CascadeConfig(candidates=(300, 200))
    # lists no longer than M: nothing to measure, nothing attached
    kept, evidence = attach_cascade(ranker, train, lists_of(3, 100, 7), CascadeConfig(candidates=(150,)))
    assert evidence["decision"] == "off" and kept.prefilter is None


def test_a_saved_cascade_loads_with_the_same_scores_and_a_floor_drops_it(ranker: Ranker, tmp_path) -> None:  # noqa: ANN001
    attached, _ = attach_cascade(ranker, rows(6000, 20), lists_of(10, 400, 100), CascadeConfig(candidates=(150,)))
    attached.save(tmp_path / "model")
    assert (tmp_path / "model" / "prefilter.ubj").exists()
    loaded = Ranker.load(tmp_path / "model")
    assert loaded.prefilter is not None and loaded.version == attached.version
    x = rows(500, 11)
    ids = np.arange(500, dtype=np.int64)
    assert np.array_equal(list_scores(loaded, x, ids)[0], list_scores(attached, x, ids)[0])
    floored = attached.with_floor(HeuristicFloor("RA", "resource_allocation_score", 1.0, 0.5))
    assert floored.prefilter is None and "cascade" not in floored.metadata
    assert "cascade" not in floored.version


def test_a_ranker_without_the_structure_columns_gets_a_pre_ranker_fitted_and_judged_without_them(
        ranker: Ranker) -> None:
    """The worker leaves those columns NaN for such a ranker: a pre-ranker fitted on them would split on values it
    never gets, and the validation lists would judge it on rows it never sees."""
    from pymk.ranking.features import STRUCTURE_FEATURES
    from pymk.ranking.training_data import RankingCase, cascade_inputs

    x = rows(500, 30)
    case = RankingCase(1, np.arange(400, dtype=np.int64), rows(400, 31).astype(np.float32), np.zeros(400, bool), 1)
    columns = [FEATURE_INDEX[name] for name in STRUCTURE_FEATURES]
    fit, lists = cascade_inputs(ranker, x, [case])
    assert fit is x and lists[0].features is case.features
    dropped = Ranker(ranker.booster, {**ranker.metadata, "structure_columns": {"decision": "dropped"}})
    fit, lists = cascade_inputs(dropped, x, [case])
    assert np.isnan(fit[:, columns]).all() and np.isnan(lists[0].features[:, columns]).all()
    others = [j for j in range(N_FEATURES) if j not in columns]
    assert np.array_equal(fit[:, others], x[:, others])
    assert np.array_equal(lists[0].degree_key, case.features[:, _DEGREE])
