"""The impressions a published list logs — its shown items and a sample of the scored but unshown candidates,
each with the feature row the model scored — built for the whole list at once.

One :func:`~pymk.ranking.features.feature_dict` and one frozen-dataclass construction per row cost ~6 µs, and a
list logs ~80 rows; here the rows' values come out of the matrix in one ``tolist()``, NaN is found with one
``isnan`` (and written as None, as ``feature_dict`` does), and :meth:`Impression.of_list` fills the records.
Every record equals the one the per-row code made, so the published JSON is the same.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pymk.events import Impression
from pymk.ranking.features import FEATURE_NAMES
from pymk.ranking.recommend import RankedList, ScoredCandidates


def feature_dicts(rows: np.ndarray) -> list[dict[str, float | None]]:
    """:func:`~pymk.ranking.features.feature_dict` of every row of a (n, features) matrix, the same dicts."""
    names = FEATURE_NAMES
    if rows.ndim != 2 or rows.shape[1] != len(names):
        raise ValueError(f"feature rows must be (n, {len(names)}), got {rows.shape}")
    out = [dict(zip(names, row, strict=True)) for row in rows.tolist()]
    missing_rows, missing_columns = np.nonzero(np.isnan(rows))
    for i, j in zip(missing_rows.tolist(), missing_columns.tolist(), strict=True):
        out[i][names[j]] = None
    return out


def shown_impressions(ranked: RankedList, ts: int, as_of: int) -> list[Impression]:
    """One impression per shown item (weight 1), its features those the model scored."""
    features = feature_dicts(ranked.feature_matrix_of_items) if ranked.items else []
    return Impression.of_list(ranked.user, ranked.model_version, ts, as_of,
                              ((item.candidate.user, item.rank, item.score, row, item.sources, 1.0)
                               for item, row in zip(ranked.items, features, strict=True)))


def unshown_impressions(user: int, scored: ScoredCandidates, sample: Sequence[tuple[int, float]],
                        model_version: str, ts: int, as_of: int) -> list[Impression]:
    """Rank-0 impressions of the sampled (candidate index, weight) pairs
    (:func:`~pymk.ranking.recommend.sample_unshown`)."""
    indices = [index for index, _ in sample]
    candidates = scored.candidates
    features = feature_dicts(scored.features[indices]) if indices else []
    return Impression.of_list(user, model_version, ts, as_of, zip(
        candidates.ids[indices].tolist(), [0] * len(indices), scored.scores[indices].tolist(), features,
        candidates.sources_of(indices), [weight for _, weight in sample], strict=True))
