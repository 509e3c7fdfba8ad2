"""The compiled tree evaluator (ranking/tree_eval) equals XGBoost: margins, probabilities, Saabas contributions and
the top 20; and when it cannot be used, the ranker falls back to inplace_predict and says why.

Tolerances: 1e-5 absolute on margins, 1e-6 on probabilities, 1e-5 on contributions (the C code keeps XGBoost's
float32 order of operations, so in practice they are equal bit for bit); contributions sum to the margin within
1e-4 (float32 sums of 500 terms).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import xgboost as xgb

from pymk.ranking.features import FEATURE_INDEX, FEATURE_NAMES, N_FEATURES
from pymk.ranking.model import Ranker
from pymk.ranking.recommend import ranking_order
from pymk.ranking.tree_eval import (
    COMPILED_C,
    EvaluatorOptions,
    build_evaluator,
    compile_library,
    convert_booster,
    library_path,
    self_check_rows,
)

REPO = Path(__file__).resolve().parent.parent
SHIPPED_RANKERS = sorted(path.parent for path in (REPO / "data" / "models").glob("ranker*/**/metadata.json"))
MARGIN_ATOL, PROBABILITY_ATOL, CONTRIBUTION_ATOL = 1e-5, 1e-6, 1e-5


def _rows(n: int, seed: int, missing: float = 0.15) -> np.ndarray:
    """Feature-like rows: counts, logs, flags, similarities, with NaN (missing) cells."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, N_FEATURES)) * rng.choice([1.0, 5.0, 50.0], N_FEATURES)
    x[:, FEATURE_INDEX["common_neighbor_count"]] = rng.poisson(2.0, n)
    for flag in ("same_company_current", "same_school", "same_industry", "mutual_profile_views"):
        x[:, FEATURE_INDEX[flag]] = rng.random(n) < 0.2
    x[rng.random(x.shape) < missing] = np.nan
    return x


def _train(trees: int, depth: int, seed: int = 0, rows: int = 3000, **params: float) -> xgb.Booster:
    x = _rows(rows, seed)
    signal = np.nan_to_num(x[:, 0]) + 2 * np.nan_to_num(x[:, FEATURE_INDEX["same_company_current"]])
    y = (signal + np.random.default_rng(seed).normal(size=rows) > 2.5).astype(np.float32)
    booster = xgb.train({"objective": "binary:logistic", "max_depth": depth, "eta": 0.1, "subsample": 0.8,
                         "colsample_bytree": 0.8, "tree_method": "hist", "nthread": 2, "seed": seed, **params},
                        xgb.DMatrix(x, label=y, missing=np.nan), num_boost_round=trees)
    booster.set_param({"nthread": 1})
    return booster


def _assert_equal_to_xgboost(booster: xgb.Booster, x: np.ndarray, options: EvaluatorOptions | None = None) -> None:
    evaluator, why = build_evaluator(booster, options or EvaluatorOptions())
    assert why == COMPILED_C and evaluator is not None
    margin = evaluator.margin(x)
    np.testing.assert_allclose(margin, booster.inplace_predict(x, predict_type="margin", missing=np.nan),
                               rtol=0, atol=MARGIN_ATOL)
    np.testing.assert_allclose(evaluator.predict(x), booster.inplace_predict(x, missing=np.nan), rtol=0,
                               atol=PROBABILITY_ATOL)
    shown = x[:40]
    expected = booster.predict(xgb.DMatrix(shown, missing=np.nan, feature_names=booster.feature_names),
                               pred_contribs=True, approx_contribs=True)
    contributions = evaluator.contributions(shown)
    np.testing.assert_allclose(contributions, expected, rtol=0, atol=CONTRIBUTION_ATOL)
    np.testing.assert_allclose(contributions.sum(axis=1), margin[:40], rtol=0, atol=1e-4)


@pytest.mark.parametrize("directory", SHIPPED_RANKERS, ids=lambda path: path.name)
def test_every_shipped_model_scores_as_xgboost(directory: Path) -> None:
    ranker = Ranker.load(directory)
    assert ranker.evaluator == COMPILED_C
    arrays = convert_booster(ranker.booster)
    x = np.concatenate([_rows(1500, seed=1), self_check_rows(arrays, 500, seed=2)])  # values on the thresholds too
    _assert_equal_to_xgboost(ranker.booster, x)


def test_shipped_models_are_found() -> None:
    assert SHIPPED_RANKERS, "no shipped ranker under data/models"


@pytest.mark.parametrize(("trees", "depth", "params"), [
    (30, 1, {}),  # stumps
    (60, 3, {}),
    (40, 6, {"min_child_weight": 40.0}),  # many leaves above the max depth: padded subtrees
    (40, 8, {}),  # deeper than the AVX-512 kernel's 6 levels: the portable loop
])
def test_fresh_models_with_missing_values_and_shallow_leaves(trees: int, depth: int, params: dict[str, float]) -> None:
    booster = _train(trees, depth, **params)
    arrays = convert_booster(booster)
    x = np.concatenate([_rows(700, seed=3, missing=0.4), self_check_rows(arrays, 300, seed=4),
                        np.full((3, N_FEATURES), np.nan)])  # all missing
    _assert_equal_to_xgboost(booster, x)


def test_shallow_leaves_exist_in_the_padded_model() -> None:
    arrays = convert_booster(_train(40, 6, min_child_weight=40.0))
    leaves_per_tree = [len(set(map(float, tree))) for tree in arrays.leaf]
    assert min(leaves_per_tree) < 2 ** arrays.depth  # some leaves are duplicated padding


def test_a_500_tree_depth_6_model_scores_as_xgboost() -> None:
    booster = _train(500, 6, rows=2000)
    assert convert_booster(booster).trees == 500
    _assert_equal_to_xgboost(booster, _rows(2000, seed=5))


def _cpu_has(flag: str) -> bool:
    try:
        return any(line.startswith("flags") and flag in line.split() for line in open("/proc/cpuinfo"))
    except OSError:
        return False


@pytest.mark.skipif(not _cpu_has("avx2"), reason="the CPU has no AVX2: the kernel cannot run here")
@pytest.mark.parametrize(("trees", "depth", "rows"), [(60, 6, 1003), (50, 4, 37), (30, 1, 130)])
def test_the_avx2_kernel_scores_as_xgboost(tmp_path: Path, trees: int, depth: int, rows: int) -> None:
    """Built for AVX2 without AVX-512 (the machines without AVX-512, and these with it, check the same kernel): a
    level's nodes looked up by register permutes; full and short blocks, missing values, values on the
    thresholds."""
    options = EvaluatorOptions(flags=("-O3", "-mavx2"), cache_dir=tmp_path)
    booster = _train(trees, depth)
    evaluator, _ = build_evaluator(booster, options)
    assert evaluator is not None and evaluator.kernel == "avx2"
    x = np.concatenate([_rows(rows, seed=9, missing=0.4), self_check_rows(convert_booster(booster), 300, seed=4),
                        np.full((3, N_FEATURES), np.nan)])
    _assert_equal_to_xgboost(booster, x, options)


def test_the_portable_kernel_scores_as_xgboost(tmp_path: Path) -> None:
    """Built without -march=native (no AVX-512): the plain C loop that other machines run."""
    options = EvaluatorOptions(flags=("-O3",), cache_dir=tmp_path)
    booster = _train(60, 6)
    evaluator, _ = build_evaluator(booster, options)
    assert evaluator is not None and evaluator.kernel == "portable"
    _assert_equal_to_xgboost(booster, np.concatenate([_rows(700, seed=8), self_check_rows(convert_booster(booster))]),
                             options)


def test_ranker_routes_predict_margin_and_explain_through_the_evaluator() -> None:
    ranker = Ranker(_train(80, 6), {"version": "test", "feature_names": list(FEATURE_NAMES)})
    x = _rows(500, seed=6)
    assert ranker.evaluator == COMPILED_C and ranker.evaluator_kernel in ("avx512", "avx2", "portable")
    np.testing.assert_allclose(ranker.margin(x), ranker.booster.inplace_predict(x, predict_type="margin"),
                               rtol=0, atol=MARGIN_ATOL)
    np.testing.assert_allclose(ranker.predict(x), ranker.booster.inplace_predict(x), rtol=0, atol=PROBABILITY_ATOL)
    explained = ranker.explain(x[:20])
    expected = ranker.booster.predict(xgb.DMatrix(x[:20], missing=np.nan, feature_names=list(FEATURE_NAMES)),
                                      pred_contribs=True, approx_contribs=True)[:, :N_FEATURES]
    np.testing.assert_allclose(explained, expected, rtol=0, atol=CONTRIBUTION_ATOL)
    assert ranker.predict(x[:0]).shape == (0,)


def test_top_20_is_xgboosts_on_candidate_matrices() -> None:
    ranker = Ranker.load(SHIPPED_RANKERS[0])
    assert ranker.evaluator == COMPILED_C
    same = 0
    for seed in range(30):
        x = _rows(1000, seed=100 + seed)
        ids = np.arange(1000, dtype=np.int64) * 7 % 1009
        degree = x[:, FEATURE_INDEX["candidate_degree_log"]]
        exact = np.asarray(ranker.booster.inplace_predict(x, missing=np.nan), np.float64)
        compiled = np.asarray(ranker.predict(x), np.float64)
        same += np.array_equal(ranking_order(compiled, degree, ids, 20), ranking_order(exact, degree, ids, 20))
    assert same == 30


# ---- fallback ------------------------------------------------------------------------------------------------
def test_a_missing_compiler_falls_back_to_xgboost_and_says_why(tmp_path: Path) -> None:
    options = EvaluatorOptions(compiler="no-such-cc-for-pymk", cache_dir=tmp_path)
    ranker = Ranker(_train(20, 3), {"version": "test", "feature_names": list(FEATURE_NAMES)}, options)
    assert ranker.evaluator == "xgboost (C compiler 'no-such-cc-for-pymk' not found)"
    assert ranker.evaluator_kernel is None
    x = _rows(300, seed=7)
    assert np.array_equal(ranker.predict(x), ranker.booster.inplace_predict(x, missing=np.nan))
    assert ranker.explain(x[:5]).shape == (5, N_FEATURES)


def test_the_setting_a_compile_error_and_too_deep_trees_fall_back(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    booster = _train(10, 4)
    assert build_evaluator(booster, EvaluatorOptions(mode="xgboost")) == (
        None, "xgboost (PYMK_TREE_EVALUATOR=xgboost)")
    broken = EvaluatorOptions(flags=("-fno-such-flag-for-pymk",), cache_dir=tmp_path)
    evaluator, why = build_evaluator(booster, broken)
    assert evaluator is None and why.startswith("xgboost (gcc failed")
    monkeypatch.setattr("pymk.ranking.tree_eval.MAX_DEPTH", 3)
    assert build_evaluator(booster, EvaluatorOptions())[1] == "xgboost (tree depth 4 > 3 supported)"
    monkeypatch.setenv("PYMK_TREE_EVALUATOR", "xgboost")
    assert EvaluatorOptions.from_env().mode == "xgboost"


def test_concurrent_compiles_leave_one_library_and_no_temporary_files(tmp_path: Path) -> None:
    options = EvaluatorOptions(cache_dir=tmp_path)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(compile_library(options))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [library_path(options)] * 3
    assert [path.name for path in tmp_path.iterdir()] == [library_path(options).name]


def test_the_cache_is_keyed_by_flags(tmp_path: Path) -> None:
    assert library_path(EvaluatorOptions(cache_dir=tmp_path)) != library_path(
        EvaluatorOptions(flags=("-O2",), cache_dir=tmp_path))


def test_the_workers_models_say_which_evaluator_serves(tmp_path: Path) -> None:
    from pymk.settings import Settings
    from pymk.streams.models import Models

    models = Models(Settings.from_env({}, home=tmp_path, tree_evaluator="xgboost"))
    if isinstance(models.scorer, Ranker):  # the shipped ranker (the heuristic has no trees)
        assert models.describe()["ranker"]["evaluator"] == "xgboost (PYMK_TREE_EVALUATOR=xgboost)"
    models = Models(Settings.from_env({}, home=tmp_path))
    if isinstance(models.scorer, Ranker):
        assert models.describe()["ranker"]["evaluator"] == COMPILED_C
