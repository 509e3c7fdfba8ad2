"""Delayed labels for the model's own traffic: impressions joined with what the users did afterwards.

An impression (user u was shown candidate c, ranked as of event time t) gets its label from the events in the
horizon (t, t + H], in event time (so a replay of history labels exactly as live traffic would have):
- ``connected`` (label 1): a connection between u and c was added in the window;
- ``dismissed`` (label 0, an explicit negative, kept apart in ``outcome``): u dismissed c in the window first;
- ``expired`` (label 0): the stream's event time passed t + H with neither;
- otherwise the impression is still pending and is not used.
A pair shown in many lists is one example: the latest impression whose window decides it (the one before the
connection or dismissal, or the latest one whose window has passed) — the freshest state the model ranked it
from. (Taking the first would label a pair shown a month before it connected as a miss.)
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from pymk.events import Impression
from pymk.ranking.features import FEATURE_NAMES

CONNECTED, DISMISSED, EXPIRED = "connected", "dismissed", "expired"


@dataclass(frozen=True)
class LabelledImpression:
    impression: Impression
    label: int
    outcome: str  # connected | dismissed | expired


def _pair(u: int, v: int) -> tuple[int, int]:
    return (u, v) if u < v else (v, u)


def label_impressions(impressions: Iterable[Impression], connections: Iterable[tuple[int, int, str, int]],
                      dismissals: Iterable[tuple[int, int, int]], horizon_ms: int,
                      event_time_ms: int) -> list[LabelledImpression]:
    """``connections``: (src, dst, action, ts); ``dismissals``: (user, candidate, ts); ``event_time_ms``: how
    far the stream's event time has come (impressions whose window is still open stay unlabelled)."""
    adds: dict[tuple[int, int], list[int]] = {}
    for src, dst, action, ts in connections:
        if action == "add":
            adds.setdefault(_pair(src, dst), []).append(ts)
    dismissed: dict[tuple[int, int], list[int]] = {}
    for user, candidate, ts in dismissals:
        dismissed.setdefault((user, candidate), []).append(ts)
    for stamps in (*adds.values(), *dismissed.values()):
        stamps.sort()

    by_pair: dict[tuple[int, int], list[Impression]] = {}
    for impression in impressions:
        by_pair.setdefault((impression.user, impression.candidate), []).append(impression)
    out: list[LabelledImpression] = []
    for (user, candidate), shown in sorted(by_pair.items()):
        decided: LabelledImpression | None = None
        for impression in sorted(shown, key=lambda i: (i.as_of, i.ts)):
            start, end = impression.as_of, impression.as_of + horizon_ms
            connected_at = _first_in(adds.get(_pair(user, candidate), ()), start, end)
            dismissed_at = _first_in(dismissed.get((user, candidate), ()), start, end)
            if connected_at is not None and (dismissed_at is None or connected_at <= dismissed_at):
                decided = LabelledImpression(impression, 1, CONNECTED)
            elif dismissed_at is not None:
                decided = LabelledImpression(impression, 0, DISMISSED)
            elif event_time_ms >= end and (decided is None or decided.outcome == EXPIRED):
                decided = LabelledImpression(impression, 0, EXPIRED)
        if decided is not None:
            out.append(decided)
    return out


def _first_in(stamps: Sequence[int], start: int, end: int) -> int | None:
    """The first ts in (start, end]."""
    i = bisect.bisect_right(stamps, start)
    return stamps[i] if i < len(stamps) and stamps[i] <= end else None


def feature_matrix(rows: Sequence[LabelledImpression]) -> np.ndarray:
    """The logged feature vectors in :data:`FEATURE_NAMES` order (a feature the logging model did not have,
    or a null, is NaN)."""
    out = np.full((len(rows), len(FEATURE_NAMES)), np.nan, dtype=np.float64)
    for i, row in enumerate(rows):
        logged: Mapping[str, float | None] = row.impression.features
        for j, name in enumerate(FEATURE_NAMES):
            value = logged.get(name)
            if value is not None:
                out[i, j] = value
    return out


def pool_weights(rows: Sequence[LabelledImpression]) -> np.ndarray:
    """Row weights that make the labelled impressions stand for the candidate pools they were drawn from: each
    row's logged ``weight`` (1 for a shown item, the size of its stratum over its sample size for an unshown
    one), then scaled per class to sum to that class's row count — the class balance stays that of the rows,
    only the mix within a class (shown, just below the list, the rest of the pool) is corrected. Unweighted,
    the shown top 20 would be half of every list's rows while it is 1-2 % of the pool, and a retrained model
    would learn to re-order the top it was shown instead of what to lift into it."""
    weights = np.array([r.impression.weight for r in rows], dtype=np.float64)
    labels = np.array([r.label for r in rows])
    for value in (0, 1):
        mask = labels == value
        if mask.any():
            weights[mask] *= mask.sum() / weights[mask].sum()
    return weights


def time_split(rows: Sequence[LabelledImpression], val_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks (train, validation): validation = the impressions with the latest as-of times."""
    as_of = np.array([r.impression.as_of for r in rows], dtype=np.int64)
    if len(rows) == 0:
        return np.zeros(0, bool), np.zeros(0, bool)
    cut = np.quantile(as_of, 1.0 - val_fraction)
    val = as_of > cut
    if not val.any() or val.all():  # everything at one time: fall back to the order of the rows
        val = np.arange(len(rows)) >= int(len(rows) * (1.0 - val_fraction))
    return ~val, val


def recall_at_k(rows: Sequence[LabelledImpression], scores: np.ndarray, k: int = 20) -> float:
    """Per user of the rows: |top-k by score ∩ connected| / |connected|, averaged over users with a connection."""
    by_user: dict[int, list[tuple[float, int, int]]] = {}
    for row, score in zip(rows, scores, strict=True):
        by_user.setdefault(row.impression.user, []).append((-float(score), row.impression.candidate, row.label))
    recalls = []
    for items in by_user.values():
        positives = sum(label for _, _, label in items)
        if positives:
            top = sorted(items)[:k]
            recalls.append(sum(label for _, _, label in top) / positives)
    return float(np.mean(recalls)) if recalls else float("nan")
