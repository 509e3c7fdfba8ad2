"""Benchmarks of the ANN index: recall against brute force, query latency, and add rates.

``pymk bench index`` (:mod:`pymk.bench.index`) uses the pieces on a trained model's embeddings. ``python -m
pymk.bench.ann`` runs :func:`run_index_benchmarks` stand-alone (no model needed) and prints the JSON;
``--sharded`` runs the sharded index's benchmark instead (:mod:`pymk.bench.ann_shards`).

Data: until trained GraphSAGE embeddings exist, two stand-ins. :func:`clustered_unit_vectors` mimics embeddings
that group users into communities (a few hundred gaussian clusters on the sphere); and
:func:`graph_propagated_embeddings` gives *real-graph* embeddings the way an untrained two-layer GraphSAGE-mean
would: random features averaged over each user's neighbourhood twice, so neighbours get similar vectors. Any
embedding matrix can be passed to the measuring functions instead.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from pymk.index.ann import AnnConfig, AnnIndex, new_faiss_index, set_threads

DEFAULT_EF_CANDIDATES = (16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)


# ------------------------------------------------------------------------------------------------- data


def normalised(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def clustered_unit_vectors(
    n: int, dim: int = 128, clusters: int = 300, spread: float = 1.0, seed: int = 0
) -> np.ndarray:
    """Unit vectors around ``clusters`` random centres. ``spread`` is the noise norm relative to the centre's,
    so a member's cosine with its centre is about 1/√(1+spread²) (0.71 at 1.0)."""
    rng = np.random.default_rng(seed)
    centres = normalised(rng.standard_normal((clusters, dim)))
    members = rng.integers(0, clusters, size=n)
    noise = rng.standard_normal((n, dim)).astype(np.float32) * (spread / np.sqrt(dim))
    return normalised(centres[members] + noise)


def graph_propagated_embeddings(
    path: str | Path, dim: int = 128, hops: int = 2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(users, unit vectors) of a real graph file: h ← normalise(h + mean of neighbours' h), ``hops`` times,
    from random gaussian features (GraphSAGE-mean with identity weights: structure without training)."""
    from pymk.datasets import load_edge_history

    history = load_edge_history(path)
    pairs = np.array([(u, v) for u, v, _ in history.connections], dtype=np.int64)
    users, endpoints = np.unique(pairs, return_inverse=True)
    endpoints = endpoints.reshape(-1, 2)
    degree = np.bincount(endpoints.ravel(), minlength=len(users)).astype(np.float32)
    features = normalised(np.random.default_rng(seed).standard_normal((len(users), dim)))
    for _ in range(hops):
        summed = np.zeros_like(features)
        np.add.at(summed, endpoints[:, 0], features[endpoints[:, 1]])
        np.add.at(summed, endpoints[:, 1], features[endpoints[:, 0]])
        features = normalised(features + summed / np.maximum(degree, 1.0)[:, None])
    return users, features


# ------------------------------------------------------------------------------------------------ recall


def measure_recall(
    index: AnnIndex,
    queries: np.ndarray,
    k: int = 100,
    *,
    ef_search: int | None = None,
    excludes: Sequence[Iterable[int]] | None = None,
) -> float:
    """Mean recall@k of the HNSW search against exact search (at the configured efSearch unless given).

    ``excludes`` (one collection per query, e.g. the query user) is applied to both searches.
    """
    total = 0.0
    for row, query in enumerate(np.asarray(queries, dtype=np.float32)):
        exclude = excludes[row] if excludes is not None else ()
        exact = {user for user, _ in index.exact_search(query, k, exclude)}
        if not exact:
            total += 1.0
            continue
        found = {user for user, _ in index.search(query, k, exclude, ef_search=ef_search)}
        total += len(found & exact) / len(exact)
    return total / max(len(queries), 1)


def choose_ef_search(
    index: AnnIndex,
    queries: np.ndarray,
    k: int = 100,
    target: float = 0.98,
    candidates: Iterable[int] = DEFAULT_EF_CANDIDATES,
    *,
    excludes: Sequence[Iterable[int]] | None = None,
) -> tuple[int, float]:
    """The smallest efSearch (among ``candidates``) whose recall@k reaches ``target``, with that recall; the
    largest candidate and its recall when none does. Values below k are searched as k (the beam holds k)."""
    tried = sorted({max(int(ef), k) for ef in candidates})
    recall = 0.0
    for ef in tried:
        recall = measure_recall(index, queries, k, ef_search=ef, excludes=excludes)
        if recall >= target:
            return ef, recall
    return tried[-1], recall


# ----------------------------------------------------------------------------------------------- latency


def query_latency_ms(
    index: AnnIndex, queries: np.ndarray, k: int, *, excludes: Sequence[Iterable[int]] | None = None
) -> dict[str, float]:
    """p50/p99/mean wall time of single-vector ``search`` calls."""
    times = []
    for row, query in enumerate(np.asarray(queries, dtype=np.float32)):
        exclude = excludes[row] if excludes is not None else ()
        started = time.perf_counter()
        index.search(query, k, exclude)
        times.append((time.perf_counter() - started) * 1000.0)
    samples = np.array(times)
    return {
        "p50_ms": float(np.percentile(samples, 50)),
        "p99_ms": float(np.percentile(samples, 99)),
        "mean_ms": float(samples.mean()),
    }


# --------------------------------------------------------------------------------------------- add rates


def raw_faiss_add_rate(vectors: np.ndarray, config: AnnConfig) -> float:
    """Vectors/s of plain FAISS HNSW ``add`` called with one vector at a time (same M, efConstruction,
    storage), from an empty index: the baseline our upsert is compared with."""
    index = new_faiss_index(config)
    rows = np.ascontiguousarray(vectors, dtype=np.float32)
    started = time.perf_counter()
    for row in range(len(rows)):
        index.add(rows[row : row + 1])
    return len(rows) / (time.perf_counter() - started)


def upsert_rate(vectors: np.ndarray, config: AnnConfig, batch_size: int = 1) -> float:
    """Vectors/s of :meth:`AnnIndex.upsert` inserting new users in batches of ``batch_size``, from empty."""
    index = AnnIndex(config)
    rows = np.ascontiguousarray(vectors, dtype=np.float32)
    users = np.arange(len(rows), dtype=np.int64) * 1_000_003  # sparse ids, as in production
    started = time.perf_counter()
    for first in range(0, len(rows), batch_size):
        index.upsert(users[first : first + batch_size], rows[first : first + batch_size])
    return len(rows) / (time.perf_counter() - started)


def replacement_rate(vectors: np.ndarray, config: AnnConfig, replacements: int, seed: int = 0) -> dict[str, float]:
    """Vectors/s of one-at-a-time upserts that *replace* users of a full index, rebuilds included (the steady
    state of a stream that recomputes embeddings)."""
    rows = np.ascontiguousarray(vectors, dtype=np.float32)
    index = AnnIndex(config)
    index.upsert(np.arange(len(rows), dtype=np.int64), rows)
    rng = np.random.default_rng(seed)
    chosen = rng.integers(0, len(rows), size=replacements)
    fresh = normalised(
        rows[rng.integers(0, len(rows), size=replacements)]
        + 0.1 * rng.standard_normal((replacements, rows.shape[1])).astype(np.float32)
    )
    rebuilds_before = index.rebuilds
    started = time.perf_counter()
    for step in range(replacements):
        index.upsert(chosen[step : step + 1], fresh[step : step + 1])
    elapsed = time.perf_counter() - started
    return {"vectors_per_s": replacements / elapsed, "rebuilds": float(index.rebuilds - rebuilds_before)}


# ------------------------------------------------------------------------------------------------- all


def _built(vectors: np.ndarray, users: np.ndarray, config: AnnConfig) -> tuple[AnnIndex, float]:
    index = AnnIndex(config)
    started = time.perf_counter()
    index.upsert(users, vectors)
    return index, time.perf_counter() - started


def _bytes_per_user(index: AnnIndex) -> dict[str, float]:
    """Serialised FAISS index (storage + graph) and our float copy, per live user."""
    users = max(len(index), 1)
    return {
        "faiss": faiss.serialize_index(index.faiss_index).nbytes / users,
        "float_copy": 4 * index.config.dim if index.config.keep_vectors else 0,
    }


def benchmark_dataset(
    name: str,
    users: np.ndarray,
    vectors: np.ndarray,
    config: AnnConfig,
    query_count: int = 200,
    recall_target: float = 0.98,
    seed: int = 0,
) -> dict[str, Any]:
    """Recall (k=100, 1000), chosen efSearch and latency for flat and sq8 storage on one embedding set.

    Queries are users' own vectors with the user excluded, as a People-You-May-Know query is.
    """
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(users), size=min(query_count, len(users)), replace=False)
    queries = vectors[rows]
    excludes = [{int(users[row])} for row in rows]
    result: dict[str, Any] = {"dataset": name, "users": len(users), "queries": len(rows)}
    for quantization in ("flat", "sq8"):
        variant = replace(config, quantization=quantization)  # type: ignore[arg-type]
        index, build_seconds = _built(vectors, users, variant)
        ef_100, recall_at_ef_100 = choose_ef_search(index, queries, 100, recall_target, excludes=excludes)
        result[quantization] = {
            "build_s": build_seconds,
            "bytes_per_user": _bytes_per_user(index),
            "recall_at_100": measure_recall(index, queries, 100, excludes=excludes),
            "recall_at_1000": measure_recall(index, queries, 1000, excludes=excludes),
            "ef_search_for_target_at_100": ef_100,
            "recall_at_chosen_ef_100": recall_at_ef_100,
            "latency_k100": query_latency_ms(index, queries, 100, excludes=excludes),
            "latency_k1000": query_latency_ms(index, queries, 1000, excludes=excludes),
        }
    # What the exact re-ranking of 2·k SQ8 candidates buys: the same graph searched for k only, whose result
    # set is then SQ8's own top-k (scores are still exact, the membership is the quantised one).
    index.reconfigure(replace(index.config, sq8_rerank_factor=1.0))
    result["sq8"]["recall_at_100_without_overfetch"] = measure_recall(index, queries, 100, excludes=excludes)
    return result


def run_index_benchmarks(
    n: int = 20_000,
    clusters: int = 300,
    query_count: int = 200,
    add_count: int = 5_000,
    threads: int = 1,
    graph_paths: Sequence[str | Path] = (),
    config: AnnConfig | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Everything ``pymk bench index --json`` reports. ``threads`` sets FAISS's OpenMP threads (1 for
    one-core figures)."""
    config = config or AnnConfig()
    set_threads(threads)
    vectors = clustered_unit_vectors(n, config.dim, clusters, seed=seed)
    users = np.arange(n, dtype=np.int64) * 7919 + 11
    report: dict[str, Any] = {
        "config": asdict(config),
        "threads": threads,
        "recall_target": 0.98,
        "datasets": [benchmark_dataset(f"clustered-{clusters}", users, vectors, config, query_count, seed=seed)],
    }
    for path in graph_paths:
        graph_users, graph_vectors = graph_propagated_embeddings(path, config.dim, seed=seed)
        report["datasets"].append(
            benchmark_dataset(
                f"propagated:{Path(path).name}", graph_users, graph_vectors, config, query_count, seed=seed
            )
        )

    adds = vectors[:add_count]
    # Raw FAISS is timed before and after ours and the faster run kept: the machine is shared, and the ratio
    # should not flatter us.
    raw_first = raw_faiss_add_rate(adds, config)
    ours_single = upsert_rate(adds, config, batch_size=1)
    ours_batch = upsert_rate(adds, config, batch_size=100)
    raw = max(raw_first, raw_faiss_add_rate(adds, config))
    report["add_rates"] = {
        "vectors": len(adds),
        "raw_faiss_one_at_a_time_per_s": raw,
        "upsert_one_at_a_time_per_s": ours_single,
        "upsert_batch_100_per_s": ours_batch,
        "upsert_one_at_a_time_vs_raw": ours_single / raw,
        "upsert_batch_100_vs_raw": ours_batch / raw,
    }
    for fraction in (config.rebuild_tombstone_fraction, 0.5):
        replacing = replacement_rate(adds, replace(config, rebuild_tombstone_fraction=fraction), add_count, seed)
        report["add_rates"][f"replacement_at_fraction_{fraction}"] = {
            "one_at_a_time_per_s": replacing["vectors_per_s"],
            "rebuilds": replacing["rebuilds"],
            "vs_raw": replacing["vectors_per_s"] / raw,
        }
    return report


def main(argv: Sequence[str] | None = None) -> None:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--sharded" in argv:  # the sharded index's scatter-gather against one replicated index (bench/ann_shards.py)
        from pymk.bench.ann_shards import main as sharded_main

        sharded_main([arg for arg in argv if arg != "--sharded"])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sharded", action="store_true", help="see pymk.bench.ann_shards")
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--clusters", type=int, default=300)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--adds", type=int, default=5_000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--graph", action="append", default=[], help="edge-list file for propagated embeddings")
    args = parser.parse_args(argv)
    faiss.omp_set_num_threads(args.threads)
    report = run_index_benchmarks(args.n, args.clusters, args.queries, args.adds, args.threads, args.graph)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
