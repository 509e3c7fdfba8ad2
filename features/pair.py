"""Features of a (query user, candidate) pair, each with the timestamp of the event that last changed it.

Pure code over the partition's graph state and a degree lookup for users of other partitions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from pymk.features.graph import PartitionGraph, adamic_adar_weight, version_ts


@dataclass(frozen=True)
class FeatureValue:
    value: float | int | None
    ts: int | None  # epoch ms of the event that last changed the value; None when nothing ever did

    def to_dict(self) -> dict[str, float | int | None]:
        return {"value": self.value, "ts": self.ts}


def _max_ts(*stamps: int | None) -> int | None:
    present = [s for s in stamps if s is not None]
    return max(present) if present else None


def graph_pair_features(graph: PartitionGraph, user: int, candidate: int,
                        degree_of: Callable[[int], tuple[int, int | None]]) -> dict[str, FeatureValue]:
    """The graph features of the contract for a local ``user`` and any ``candidate``.

    ``degree_of(v)`` gives (degree, ts of last change) of any user; the candidate usually lives in another
    partition, so its degree comes from the worker's table of all degrees.
    """
    own = graph.adjacency_row(user)
    degree_u, degree_u_ts = graph.degree_with_ts(user)
    degree_v, degree_v_ts = degree_of(candidate)
    count, count_ts = graph.common_neighbor_count(user, candidate)
    common = graph.common_neighbors(user, candidate)
    score = 0.0
    score_ts: int | None = None
    for z in common:
        mirror = graph.mirror_row(z)
        score += adamic_adar_weight(mirror.alive)
        # z's degree (any change of z's registers) and the two edges through z can change the score
        score_ts = _max_ts(score_ts, max(version_ts(v) for v in mirror.versions.values()),
                           version_ts(own.versions[z]))
    union = degree_u + degree_v - count
    edge_version = own.versions.get(candidate)
    if edge_version is not None and edge_version % 2 == 0:
        distance, distance_ts = 1, version_ts(edge_version)
    elif count > 0:
        distance, distance_ts = 2, _max_ts(count_ts, None if edge_version is None else version_ts(edge_version))
    else:
        distance, distance_ts = 3, None if edge_version is None else version_ts(edge_version)
    return {
        "common_neighbor_count": FeatureValue(count, count_ts),
        "adamic_adar_score": FeatureValue(score, score_ts),
        "jaccard_sim": FeatureValue(count / union if union > 0 else 0.0, _max_ts(count_ts, degree_u_ts, degree_v_ts)),
        "graph_distance_bucket": FeatureValue(distance, distance_ts),
        "query_degree_log": FeatureValue(math.log1p(degree_u), degree_u_ts),
        "candidate_degree_log": FeatureValue(math.log1p(degree_v), degree_v_ts),
    }
