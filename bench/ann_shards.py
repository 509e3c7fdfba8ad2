"""Benchmark of the sharded ANN (PYMK_ANN_MODE=sharded): the cost and tail latency of Stage 1's search when the
HNSW graph is split over workers, against one replicated index, and the recall of both against brute force.

``python -m pymk.bench.ann --sharded`` (or ``python -m pymk.bench.ann_shards``) prints one JSON object. The users
are split over ``shards`` by partition (``partition_for_user`` over 12 partitions, partition p to shard p mod
shards); shard 0 is the measuring process's own (searched in-process, as a worker's local shard), the others
are served by child processes over HTTP with the worker's handler code (:func:`search_shard`, the wire format),
so a gather pays what a worker's does: one request per peer, the peers' searches in parallel with the local
one, the merge. The queries come in batches of ``batch`` users (a slice's prefetch, ``PYMK_ANN_SHARD_BATCH``),
each excluding ``exclude`` random users (a user's connections), asking k = ann_k + ANN_SPARES as the worker does.

Figures (wall ms): ``replicated`` one index of every user, each batch's queries searched one after the other;
``local_shard`` the same batch on the local shard only (a third of the users); ``scatter_gather`` the whole
gather. Recall@k against the exact global top k for both modes. The machine's load average is in the JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import numpy as np

from pymk.bench.ann import clustered_unit_vectors
from pymk.index.ann import AnnConfig, AnnIndex, set_threads
from pymk.index.vector_store import VectorStore
from pymk.ranking.incremental import ANN_SPARES
from pymk.settings import Settings
from pymk.streams.ann_shards import (
    SHARD_PATH,
    ShardedAnn,
    decode_request,
    encode_answer,
    search_shard,
)
from pymk.streams.partitioning import partition_for_user

PARTITIONS = 12


def dataset(n: int, clusters: int, seed: int, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Users, their unit vectors and their partitions (the same in every process for the same arguments)."""
    vectors = clustered_unit_vectors(n, dim, clusters, seed=seed)
    users = np.arange(n, dtype=np.int64) * 7919 + 11
    partitions = np.fromiter((partition_for_user(int(u), PARTITIONS) for u in users), np.int64, n)
    return users, vectors, partitions


def shard_partitions(shard: int, shards: int) -> set[int]:
    return {p for p in range(PARTITIONS) if p % shards == shard}


def build_shard(users: np.ndarray, vectors: np.ndarray, partitions: np.ndarray, held: set[int] | None,
                config: AnnConfig) -> AnnIndex:
    index = AnnIndex(config)
    mine = np.ones(len(users), bool) if held is None else np.isin(partitions, list(held))
    index.upsert(users[mine], vectors[mine])
    return index


def _serve_shard(shard: int, shards: int, n: int, clusters: int, seed: int, config: dict[str, Any], port: int,
                 ready: Any) -> None:
    """A child process: one shard behind the worker's handler code on an aiohttp server."""
    from aiohttp import web

    set_threads(1)
    users, vectors, partitions = dataset(n, clusters, seed, config["dim"])
    held = shard_partitions(shard, shards)
    index = build_shard(users, vectors, partitions, held, AnnConfig(**config))

    async def handle(request: web.Request) -> web.Response:
        queries, k, excludes = decode_request(await request.read())
        ids, scores = await search_shard(index, queries, k, excludes)
        return web.Response(body=encode_answer(ids, scores, held), content_type="application/octet-stream")

    app = web.Application(client_max_size=64 * 2**20)
    app.router.add_post(SHARD_PATH, handle)
    ready.set()
    web.run_app(app, host="127.0.0.1", port=port, print=None, handle_signals=True)


class _LocalShard:
    """What ShardedAnn reads of a worker's GlobalIndex: its graph, partitions, and every user's vector."""

    def __init__(self, index: AnnIndex, partitions: set[int], vector_of: dict[int, np.ndarray]) -> None:
        self.index = index
        self.graph_partitions = partitions
        self._vector_of = vector_of

    def vector(self, user: int) -> np.ndarray | None:
        return self._vector_of.get(user)

    def neighbours(self, user: int, k: int, exclude: set[int]) -> list[tuple[int, float]]:
        return self.index.search(self._vector_of[user], k, exclude | {user})


def vector_store_bytes_per_user(users: np.ndarray, vectors: np.ndarray, partitions: np.ndarray) -> dict[str, float]:
    """What the replicated vector store costs per user (traced allocations: arrays with their growth slack, and the
    dict), next to its arrays alone."""
    import tracemalloc

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        store = VectorStore(vectors.shape[1])
        for user, vector, partition in zip(users.tolist(), vectors, partitions.tolist(), strict=True):
            store.put(user, vector, partition)
        traced = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    arrays = sum(array.nbytes for array in store.arrays().values())
    return {"traced": round(traced / len(users), 1), "arrays": round(arrays / len(users), 1)}


def rebalance_fill(users: np.ndarray, vectors: np.ndarray, partitions: np.ndarray, held: set[int]) -> dict[str, float]:
    """A worker's rebalance: a GlobalIndex with every vector in its store is assigned ``held``; its graph is filled
    in chunks on the event loop. The fill's wall time and the longest the loop waited between two of its turns."""
    import tempfile
    from pathlib import Path

    from pymk.index.records import EmbeddingRecord
    from pymk.streams.global_index import GlobalIndex

    with tempfile.TemporaryDirectory() as folder:
        index = GlobalIndex(Settings(partitions=PARTITIONS, ann_mode="sharded"), Path(folder))
        for user, vector, partition in zip(users.tolist(), vectors, partitions.tolist(), strict=True):
            index.apply(EmbeddingRecord(user, 1, 0, "bench", vector), partition)

        async def fill() -> dict[str, float]:
            gaps: list[float] = []
            started = last = time.perf_counter()
            index.assign(held)
            while index.graph_partitions != held:
                await asyncio.sleep(0)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now
            return {"users": len(index.index), "seconds": round(time.perf_counter() - started, 3),
                    "longest_loop_wait_ms": round(1000 * max(gaps, default=0.0), 2)}

        return asyncio.run(fill())


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _percentiles(samples: Sequence[float]) -> dict[str, float]:
    array = np.asarray(samples)
    return {"p50_ms": round(float(np.percentile(array, 50)), 3), "p99_ms": round(float(np.percentile(array, 99)), 3),
            "max_ms": round(float(array.max()), 3), "mean_ms": round(float(array.mean()), 3)}


def _recall(found: Sequence[tuple[int, float]], exact: Sequence[tuple[int, float]]) -> float:
    return len({u for u, _ in found} & {u for u, _ in exact}) / max(1, len(exact))


def run_sharded_benchmark(n: int = 20_000, shards: int = 3, clusters: int = 300, batches: int = 30,
                          batch: int = 16, k: int | None = None, exclude: int = 100, seed: int = 0,
                          config: AnnConfig | None = None, sigmas: float | None = None) -> dict[str, Any]:
    config = config or AnnConfig()
    k = k if k is not None else Settings().candidates_ann_k + ANN_SPARES
    sigmas = sigmas if sigmas is not None else Settings().ann_shard_k_sigmas
    set_threads(1)
    context = multiprocessing.get_context("spawn")
    ports = [_free_port() for _ in range(shards - 1)]
    readies = [context.Event() for _ in ports]
    children = [context.Process(target=_serve_shard, args=(shard + 1, shards, n, clusters, seed, asdict(config),
                                                           port, ready), daemon=True)
                for shard, (port, ready) in enumerate(zip(ports, readies, strict=True))]
    for child in children:
        child.start()
    try:
        users, vectors, partitions = dataset(n, clusters, seed, config.dim)
        started = time.perf_counter()
        replicated = build_shard(users, vectors, partitions, None, config)
        build_replicated_s = time.perf_counter() - started
        mine = shard_partitions(0, shards)
        started = time.perf_counter()
        local_index = build_shard(users, vectors, partitions, mine, config)
        build_local_s = time.perf_counter() - started
        for ready in readies:
            if not ready.wait(600):
                raise TimeoutError("a shard server did not start")
        time.sleep(0.5)  # the servers bind after setting ready
        local = _LocalShard(local_index, mine, dict(zip(users.tolist(), vectors, strict=True)))
        rng = np.random.default_rng(seed + 1)
        report = asyncio.run(_measure(local, replicated, users, ports, batches, batch, k, exclude, sigmas, rng))
    finally:
        for child in children:
            child.terminate()
            child.join(10)
    report.update({
        "n": n, "shards": shards, "partitions": PARTITIONS, "k": k, "batch": batch, "batches": batches,
        "exclude_per_query": exclude, "config": asdict(config),
        "local_shard_users": len(local_index), "replicated_users": len(replicated),
        "build_seconds": {"replicated": round(build_replicated_s, 2), "local_shard": round(build_local_s, 2)},
        # per user of each structure: the local shard's graph (FAISS codes and links, numpy copies) on one worker
        # only; the vector store on every worker
        "bytes_per_user": {"shard_graph": round(sum(v for key, v in local_index.memory_bytes().items()
                                                    if key != "slots") / len(local_index), 1),
                           "vector_store": vector_store_bytes_per_user(users, vectors, partitions)},
        # a rebalance assigning the local shard's partitions to a worker that has every vector in its store
        "rebalance_fill": rebalance_fill(users, vectors, partitions, mine),
        "load_average": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count(),
    })
    return report


async def _measure(local: _LocalShard, replicated: AnnIndex, users: np.ndarray, ports: list[int], batches: int,
                   batch: int, k: int, exclude: int, sigmas: float, rng: np.random.Generator) -> dict[str, Any]:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async def post(url: str, body: bytes, timeout_s: float) -> bytes:
            async with session.post(url, data=body, timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
                response.raise_for_status()
                return await response.read()

        client = ShardedAnn(local, PARTITIONS, lambda: [f"http://127.0.0.1:{port}" for port in ports], post,
                            timeout_s=60.0, sigmas=sigmas)
        timings: dict[str, list[float]] = {"replicated": [], "local_shard": [], "scatter_gather": []}
        recalls: dict[str, list[float]] = {"replicated": [], "sharded": []}
        await client.prefetch([(int(users[0]), frozenset())], k)  # connections opened, code warmed
        for _ in range(batches):
            asked = rng.choice(users, batch, replace=False).tolist()
            excludes = [frozenset(rng.choice(users, exclude, replace=False).tolist()) - {u} for u in asked]
            queries = np.stack([local.vector(u) for u in asked])
            started = time.perf_counter()
            one = [replicated.search(queries[i], k, excludes[i] | {asked[i]}) for i in range(batch)]
            timings["replicated"].append(1000 * (time.perf_counter() - started))
            started = time.perf_counter()
            await search_shard(local.index, queries, k, [e | {u} for e, u in zip(excludes, asked, strict=True)])
            timings["local_shard"].append(1000 * (time.perf_counter() - started))
            started = time.perf_counter()
            await client.prefetch(list(zip(asked, excludes, strict=True)), k)
            timings["scatter_gather"].append(1000 * (time.perf_counter() - started))
            for i, user in enumerate(asked):
                exact = replicated.exact_search(queries[i], k, excludes[i] | {user})
                recalls["replicated"].append(_recall(one[i], exact))
                recalls["sharded"].append(_recall(client.ann(user, k, excludes[i]), exact))
    return {
        "per_batch": {name: _percentiles(samples) for name, samples in timings.items()},
        "per_query_mean_ms": {name: round(float(np.mean(samples)) / batch, 3) for name, samples in timings.items()},
        "recall_at_k": {name: round(float(np.mean(values)), 5) for name, values in recalls.items()},
        "recall_at_k_min": {name: round(float(np.min(values)), 5) for name, values in recalls.items()},
        "shard_stats": client.describe(),
        "peers": len(ports), "shard_k_sigmas": sigmas,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--shards", type=int, default=3)
    parser.add_argument("--clusters", type=int, default=300)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--k", type=int, default=None, help="default: the worker's ann_k + ANN_SPARES")
    parser.add_argument("--exclude", type=int, default=100)
    parser.add_argument("--sigmas", type=float, default=None,
                        help="the first round's margin (PYMK_ANN_SHARD_K_SIGMAS, default 4); 0: full k per shard")
    args = parser.parse_args(argv)
    print(json.dumps(run_sharded_benchmark(args.n, args.shards, args.clusters, args.batches, args.batch, args.k,
                                           args.exclude, sigmas=args.sigmas), indent=2))


if __name__ == "__main__":
    main()
