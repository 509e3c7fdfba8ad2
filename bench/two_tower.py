"""``python -m pymk.bench.two_tower``: train the two-tower ranker on an edge-list file, then measure its inference
on one thread (a user with 1,000 candidates: inputs, both towers, the dot products; the candidate tower alone in
batches)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from pymk.index.embedder import Embedder, salt_for_version
from pymk.index.memory_graph import AdjacencyGraph
from pymk.index.sage import load_model
from pymk.ranking.two_tower import (
    LOSSES,
    SnapshotSource,
    TowerFeatureSource,
    TwoTowerConfig,
    TwoTowerModel,
    TwoTowerRanker,
    tower_inputs,
    train_two_tower,
)


def benchmark(model: TwoTowerModel, source: TowerFeatureSource, users: Sequence[int], candidates: int = 1000,
              repeats: int = 20, batch_rows: int = 100_000, seed: int = 0) -> dict[str, float]:
    """Per-user latency of 1 query + ``candidates`` candidates (inputs from the source, both towers, dot),
    and batch throughput of the candidate tower alone (vectors/s). Runs in the current torch thread setting."""
    rng = np.random.default_rng(seed)
    ranker = TwoTowerRanker(model)
    pool = np.asarray(users, dtype=np.int64)
    timings, input_timings = [], []
    for _ in range(repeats):
        user = int(pool[rng.integers(pool.shape[0])])
        chosen = pool[rng.integers(0, pool.shape[0], candidates)]
        t0 = time.perf_counter()
        inputs = tower_inputs(chosen, source)
        t1 = time.perf_counter()
        query = model.query_vectors(tower_inputs([user], source))[0]
        _ = model.candidate_vectors(inputs) @ query
        t2 = time.perf_counter()
        input_timings.append(t1 - t0)
        timings.append(t2 - t0)
    ranker.score(int(pool[0]), pool[:candidates], source)  # the public path, once (not timed)
    rows = tower_inputs(pool[rng.integers(0, pool.shape[0], min(batch_rows, 10_000))], source)
    rows = np.tile(rows, (math.ceil(batch_rows / rows.shape[0]), 1))[:batch_rows]
    t0 = time.perf_counter()
    for start in range(0, rows.shape[0], 8192):
        model.candidate_vectors(rows[start:start + 8192])
    batch_seconds = time.perf_counter() - t0
    return {"per_user_ms_median": 1e3 * float(np.median(timings)), "per_user_ms_p95": 1e3 * float(
        np.percentile(timings, 95)), "inputs_ms_median": 1e3 * float(np.median(input_timings)),
            "candidate_vectors_per_s": rows.shape[0] / batch_seconds, "torch_threads": torch.get_num_threads()}


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m pymk.bench.two_tower --data FILE --sage-dir DIR --out DIR [--loss B2] [--train-share 0.8]``:
    train on the first ``train-share`` of the file's connections (protocol order) and print the metadata summary
    and the inference benchmark (one thread)."""
    import argparse

    from pymk.datasets import load_edge_history

    parser = argparse.ArgumentParser(description="Train the two-tower ranker on an edge-list file.")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--sage-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--loss", choices=LOSSES, default="B2")
    parser.add_argument("--split", choices=("time", "random"), default="time")
    parser.add_argument("--train-share", type=float, default=0.8)
    parser.add_argument("--epochs", type=int, default=TwoTowerConfig.epochs)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    connections = load_edge_history(args.data).connections
    connections = connections[: int(args.train_share * len(connections))]
    config = TwoTowerConfig(loss=args.loss, split=args.split, epochs=args.epochs, threads=args.threads,
                            seed=args.seed)
    result = train_two_tower(connections, None, args.sage_dir, args.out, config)
    summary = {key: value for key, value in result.metadata.items() if key not in ("history", "hyper_parameters")}
    summary["curve_png"] = str(result.curve_png)
    torch.set_num_threads(1)
    sage, _ = load_model(args.sage_dir)
    graph = AdjacencyGraph((u, v) for u, v, _ in connections)
    users = np.array(sorted(graph.users()), dtype=np.int64)
    source = SnapshotSource(graph, users, Embedder(sage, graph, graph).embed(users, salt_for_version(
        str(sage.version))))
    summary["benchmark"] = benchmark(result.model, source, users.tolist())
    print(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
