"""Throughput of stream-time user embedding (2-hop sampling + feature encoding + GraphSAGE) on one core.

    python -m pymk.bench.embed [--data data/collegemsg/CollegeMsg.txt] [--model DIR] [--profiles]

Without ``--model`` an untrained default-config model is used (the rate does not depend on the weights).
``--profiles`` gives every user a synthetic profile (:func:`pymk.synthetic.behaviour_for_replay`), so
profile encoding is part of the measured cost.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from pymk.datasets import load_edge_history
from pymk.events import Profile, UserEvent
from pymk.features.profile import merge_profile
from pymk.index.embedder import Embedder
from pymk.index.memory_graph import AdjacencyGraph
from pymk.index.node_features import NodeFeatureSource
from pymk.index.sage import GraphSage, SageConfig, load_model
from pymk.index.sampling import NeighbourSource
from pymk.paths import bundled_data
from pymk.synthetic import behaviour_for_replay

DEFAULT_DATA = bundled_data("collegemsg/CollegeMsg.txt")


@dataclass(frozen=True)
class EmbeddingRate:
    users: int  # users embedded per run
    batch_size: int
    threads: int
    cold_cache: bool  # a fresh Embedder (empty profile-encoding cache) per run
    runs: int
    median_seconds: float
    best_seconds: float
    users_per_second: float  # users / median_seconds


def measure_embedding_rate(model: GraphSage, graph: NeighbourSource, features: NodeFeatureSource,
                           users: Sequence[int] | np.ndarray, *, batch_size: int = 1000, salt: int = 0,
                           threads: int = 1, runs: int = 5, cold_cache: bool = True) -> EmbeddingRate:
    """Time ``Embedder.embed(users)`` ``runs`` times with ``threads`` torch threads (restored after)."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        embedder = Embedder(model, features, graph, batch_size=batch_size)
        embedder.embed(users[: min(len(users), 8)], salt)  # first-call costs (torch dispatch) out of the timing
        timings = []
        for _ in range(runs):
            if cold_cache:
                embedder = Embedder(model, features, graph, batch_size=batch_size)
            started = time.perf_counter()
            embedder.embed(users, salt)
            timings.append(time.perf_counter() - started)
    finally:
        torch.set_num_threads(previous_threads)
    median = statistics.median(timings)
    return EmbeddingRate(len(users), batch_size, threads, cold_cache, runs, median, min(timings), len(users) / median)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--model", type=Path, help="saved model directory (default: untrained model)")
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profiles", action="store_true", help="synthetic profiles for every user")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    history = load_edge_history(args.data)
    profiles: dict[int, Profile] = {}
    if args.profiles:
        for event in behaviour_for_replay(history.connections, args.seed):
            if isinstance(event, UserEvent):
                profiles[event.user] = merge_profile(profiles.get(event.user), event.profile)
    graph = AdjacencyGraph(((u, v) for u, v, _ in history.connections), profiles)
    if args.model:
        model, _ = load_model(args.model)
    else:
        torch.manual_seed(args.seed)
        model = GraphSage(SageConfig())
    users = np.array(sorted(graph.users()), dtype=np.int64)
    users = np.random.default_rng(args.seed).choice(users, size=min(args.users, users.shape[0]), replace=False)
    report = {"data": str(args.data), "graph_users": graph.num_users, "graph_edges": graph.num_edges,
              "profiles": len(profiles), "model": str(args.model or "untrained")}
    for cold in (True, False):
        rate = measure_embedding_rate(model, graph, graph, users, batch_size=args.batch_size, salt=args.seed,
                                      threads=args.threads, runs=args.runs, cold_cache=cold)
        report["cold_cache" if cold else "warm_cache"] = asdict(rate)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
