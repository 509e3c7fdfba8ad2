"""The cold-start scorer: a fixed, additive blend of the features, used until a model is trained.

    score = AA + 0.5·log1p(CN)                                 graph: Adamic-Adar leads (the best single
                                                                 heuristic on the reference graphs), CN breaks
                                                                 its ties with diminishing returns
          + 0.3·log1p(views user→candidate) + 0.5·log1p(mutual views)
          + 0.3·exp(−days since the latest view / 7)            a view last week says more than one last year
          + 0.2·log1p(co-engaged items)
          + 0.5·same company + 0.3·same school + 0.1·same industry
          + 0.5·skill Jaccard + 0.3·title cosine
          + 0.2·exp(−geo km / 50)                               neighbours in the same city
          + 1.0·embedding cosine                                what ANN candidates (no mutuals) live on

Missing values (no views, no geo, no embedding) contribute 0. Each term is one feature's contribution, so
:meth:`HeuristicScorer.explain` gives the reasons' ``top_features`` the same way a model's SHAP values do.
"""

from __future__ import annotations

import numpy as np

from pymk.ranking.features import FEATURE_INDEX, N_FEATURES

HEURISTIC_VERSION = "heuristic-v1"

# feature → weight of its (transformed) value
WEIGHTS: dict[str, float] = {
    "adamic_adar_score": 1.0,
    "common_neighbor_count": 0.5,
    "query_viewed_candidate_profile": 0.3,
    "mutual_profile_views": 0.5,
    "profile_view_recency_days": 0.3,
    "co_engaged_with_content": 0.2,
    "same_company_current": 0.5,
    "same_school": 0.3,
    "same_industry": 0.1,
    "skill_jaccard_sim": 0.5,
    "title_cosine_sim": 0.3,
    "geo_distance_km": 0.2,
    "gnn_embedding_cosine_sim": 1.0,
}
_LOG_FEATURES = ("common_neighbor_count", "query_viewed_candidate_profile", "mutual_profile_views",
                 "co_engaged_with_content")
RECENCY_SCALE_DAYS = 7.0
GEO_SCALE_KM = 50.0


# The evaluation's reference heuristics (pymk.ranking.evaluation), each as the feature column that orders a list
# as it does (popularity: log1p(degree), monotone in the past degree); the ranker's floor is chosen among them.
REFERENCE_HEURISTIC_COLUMNS: dict[str, str] = {
    "CN": "common_neighbor_count",
    "AA": "adamic_adar_score",
    "RA": "resource_allocation_score",
    "popularity": "candidate_degree_log",
}


class HeuristicScorer:
    """Scores with :data:`WEIGHTS` (see the module doc); same interface as the trained ranker."""

    version = HEURISTIC_VERSION

    def explain(self, features: np.ndarray) -> np.ndarray:
        """(n, 17) additive terms; their row sums are the scores."""
        features = np.asarray(features, np.float64)
        terms = np.zeros((len(features), N_FEATURES))
        for name, weight in WEIGHTS.items():
            column = features[:, FEATURE_INDEX[name]]
            if name in _LOG_FEATURES:
                value = np.log1p(np.maximum(column, 0.0))
            elif name == "profile_view_recency_days":
                value = np.exp(-np.maximum(column, 0.0) / RECENCY_SCALE_DAYS)
            elif name == "geo_distance_km":
                value = np.exp(-np.maximum(column, 0.0) / GEO_SCALE_KM)
            else:
                value = column
            terms[:, FEATURE_INDEX[name]] = weight * np.nan_to_num(value, nan=0.0)
        return terms

    def predict(self, features: np.ndarray) -> np.ndarray:
        return self.explain(features).sum(axis=1)
