"""What every offline learning step of pymk shares — GraphSAGE, the two towers, the ranker, the evaluation: the
error a leakage guard raises, and the area under the ROC curve their validations report."""

from __future__ import annotations

import math

import numpy as np


class LeakageError(AssertionError):
    """The future leaked into what a model or a method may see: a validation edge visible during validation,
    a feature computed from an event at or after its as-of time, a future pair in the past graph."""


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve: the probability that a random positive outscores a random negative (the
    Mann-Whitney U, tied scores counted half); NaN without both classes."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, np.float64)
    positives = int(labels.sum())
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        return math.nan
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based mean rank of each run of equal scores
    return float((average_rank[inverse[labels]].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def roc_auc_of(positive_scores: np.ndarray, negative_scores: np.ndarray) -> float:
    """:func:`roc_auc` of two score samples, the positives' and the negatives'."""
    positive_scores, negative_scores = np.asarray(positive_scores), np.asarray(negative_scores)
    labels = np.r_[np.ones(len(positive_scores), bool), np.zeros(len(negative_scores), bool)]
    return roc_auc(labels, np.concatenate([positive_scores, negative_scores]))
