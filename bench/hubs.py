"""`pymk bench hubs`: what the hub policy (``PYMK_HUB_DEGREE``, features/graph.py) costs in quality and saves in work.

A hub is a user with more connections than the cap; with the policy, no 2-path runs through one. On each graph,
for each cap (none first), over the evaluation protocol's split (``pymk evaluate``'s; the past graph only):

* **quality**: Recall@20 and MRR of the graph heuristics (CN, AA, RA) with hub-mediated 2-paths removed, and the
  share of the future pairs still reachable in 2 hops (the ceiling of Stage 1's graph source). The learned
  ranker is not retrained per cap here: its graph columns are these same sums, so the heuristics bound the
  change; a product row needs ``pymk evaluate`` with the cap set.
* **work**: per list, the 2-hop pass's entries (Σ of the degrees of the user's non-hub neighbours: what
  ``two_hop_arrays`` reads); per connection event of the history replayed in order, the users whose 2-hop set
  changes (a neighbour of one endpoint sees the other appear — none when that endpoint is a hub), which with
  ``PYMK_REFRESH_SCOPE=two-hop`` are lists owed.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pymk.datasets import load_edge_history
from pymk.paths import bundled_data
from pymk.ranking.evaluation import (
    AdamicAdar,
    CommonNeighbours,
    EvaluationSplit,
    ResourceAllocation,
    SplitKind,
    make_split,
    score_method,
)

DEFAULT_GRAPHS: tuple[tuple[Path, SplitKind], ...] = (
    (bundled_data("ego-facebook/facebook_combined.txt.gz"), "random"),
    (bundled_data("ca-hepph/CA-HepPh.txt.gz"), "random"),
    (bundled_data("collegemsg/CollegeMsg.txt"), "time"),
)
DEFAULT_CAPS = (0, 1000, 300, 100, 50, 20)  # 0: no cap


def _reachable_share(split: EvaluationSplit, cap: int) -> float:
    """Future (query, target) pairs with a 2-path through a non-hub in the past graph."""
    arrays = split.arrays
    hits = total = 0
    for user in split.query_users:
        index = arrays.index_of[user]
        middles = arrays.row(index)
        if cap:
            middles = middles[arrays.degree[middles] <= cap]
        reach = set(np.concatenate([arrays.row(int(z)) for z in middles]).tolist()) if len(middles) else set()
        for target in split.future_neighbours[user]:
            total += 1
            hits += arrays.index_of[target] in reach
    return hits / total if total else 0.0


def _list_reads(split: EvaluationSplit, cap: int) -> float:
    """Mean entries a query user's 2-hop pass reads: Σ deg z over its non-hub neighbours z."""
    arrays = split.arrays
    total = 0
    for user in split.query_users:
        degrees = arrays.degree[arrays.row(arrays.index_of[user])]
        total += int(degrees[degrees <= cap].sum() if cap else degrees.sum())
    return total / max(1, len(split.query_users))


def _event_fanout(connections: Sequence[tuple[int, int, int]], cap: int) -> dict[str, float]:
    """The history replayed in order: users whose 2-hop set a connection event changes (the neighbours of each
    non-hub endpoint, the other endpoint excepted), mean and max over the events."""
    neighbours: dict[int, set[int]] = defaultdict(set)
    fanouts = []
    for u, v, _ in connections:
        if v in neighbours[u] or u == v:
            continue
        neighbours[u].add(v)
        neighbours[v].add(u)
        fanout = 0
        for endpoint in (u, v):
            degree = len(neighbours[endpoint])
            if not cap or degree <= cap:
                fanout += degree - 1  # the endpoint's other neighbours now reach the other end through it
        fanouts.append(fanout)
    values = np.asarray(fanouts, dtype=np.float64)
    return {"mean": round(float(values.mean()), 1) if len(values) else 0.0,
            "p99": round(float(np.percentile(values, 99)), 1) if len(values) else 0.0,
            "max": int(values.max()) if len(values) else 0}


def bench_hubs(graphs: Sequence[tuple[Path, SplitKind]] = DEFAULT_GRAPHS,
               caps: Sequence[int] = DEFAULT_CAPS) -> dict[str, Any]:
    out: list[dict[str, Any]] = []
    for path, kind in graphs:
        started = time.perf_counter()
        history = load_edge_history(path)
        split = make_split(history, kind)
        degrees = split.arrays.degree
        rows = []
        for cap in caps:
            methods = [method(split, cap) for method in (CommonNeighbours, AdamicAdar, ResourceAllocation)]
            scores = {m.name: score_method(split, m, ks=(20,)) for m in methods}
            rows.append({
                "hub_degree": cap or None,
                "hubs": int((degrees > cap).sum()) if cap else 0,
                "recall_at_20": {name: round(s.recall[20], 4) for name, s in scores.items()},
                "mrr": {name: round(s.mrr, 4) for name, s in scores.items()},
                "future_pairs_reachable_in_2_hops": round(_reachable_share(split, cap), 4),
                "two_hop_entries_read_per_list": round(_list_reads(split, cap), 1),
                "users_whose_2_hop_changes_per_connection_event": _event_fanout(history.connections, cap),
            })
        out.append({"graph": Path(path).name, "split": kind, "users": int(split.arrays.size),
                    "max_degree": int(degrees.max()), "query_users": len(split.query_users),
                    "rows": rows, "seconds": round(time.perf_counter() - started, 1)})
    return {"bench": "hubs", "graphs": out,
            "note": "heuristics over the evaluation split's past graph, without hub-mediated 2-paths; "
                    "the learned ranker is not retrained per cap"}
