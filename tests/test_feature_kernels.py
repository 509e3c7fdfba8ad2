"""The feature matrix's compiled passes against their Python definitions, bit for bit."""

from __future__ import annotations

import math

import numpy as np

from pymk.features.activity import activity_at
from pymk.ranking.features import DAY_MS, candidate_activity_columns, write_candidate_activity
from pymk.ranking.source import ActivityTable
from pymk.ranking.tree_eval import feature_kernels


def test_the_compiled_activity_columns_are_activity_at_bit_for_bit() -> None:
    """``activity_columns`` (tree_eval.c) writes into a matrix what ``activity_at`` gives pair by pair and the numpy
    path gives for the list: anchors after the as-of time (read at the anchor), unknown users (0 and NaN), ages of
    years and of one millisecond, values spanning many magnitudes; only its own four columns written."""
    assert feature_kernels() is not None, "gcc is there in CI: the compiled pass must be the one tested"
    rng = np.random.default_rng(3)
    as_of = 1_700_000_000_000
    for case in range(50):
        n = int(rng.integers(1, 300))
        ages = rng.choice([0, 1, 999, DAY_MS, 3 * 365 * DAY_MS], size=n) + rng.integers(-2 * DAY_MS, 40 * DAY_MS, n)
        anchors = (as_of - ages).astype(np.int64)
        values = rng.random((n, 3)) * 10.0 ** rng.integers(-8, 6, size=(n, 1))
        known = rng.random(n) > 0.2
        values[~known] = 0.0
        anchors[~known] = 0
        table = ActivityTable(values, anchors, known)
        out = np.full((n, 12), 7.0)
        write_candidate_activity(table, as_of, out, 5)
        assert np.array_equal(out[:, :5], np.full((n, 5), 7.0)) and np.array_equal(out[:, 9:], np.full((n, 3), 7.0))
        got = out[:, 5:9]
        assert np.array_equal(got.view(np.int64), candidate_activity_columns(table, as_of).view(np.int64)), case
        for i in range(n):
            if known[i]:
                expected = (*activity_at(values[i].tolist(), int(anchors[i]), as_of),
                            max(0.0, float(as_of) - float(anchors[i])) / DAY_MS)
            else:
                expected = (0.0, 0.0, 0.0, math.nan)
            assert np.array_equal(got[i], np.array(expected), equal_nan=True), (case, i)
