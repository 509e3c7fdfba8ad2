"""`pymk bench capacity`: the measured inputs of the capacity plan (docs/capacity.md).

What grows with the network, measured on real graphs replayed through the same partitioned state the worker
keeps (``features/graph.py``: adjacency, mirrors, reverse index, materialised common-neighbour rows), and the
per-user records every worker holds (its copy of the index and of ``user-globals``):

* **bytes per user by store, against degree**: the encoded RocksDB rows (key + value, before RocksDB's own
  compression) of each user, with the mirror and reverse rows of a user counted for that user wherever they
  live (a user's adjacency is copied once to each other partition holding one of its neighbours);
* **work per connection event, against the endpoints' degree**: common-neighbour updates, mirror register
  changes, messages between partitions and their encoded bytes (the ``partition-messages`` topic);
* **per-user records on every worker**: the embedding record, the FAISS HNSW index's bytes per vector (its own
  serialisation, at the served M), the degree and profile records of ``user-globals``.

The cluster is in-process (P partitions exchanging their outbox messages directly, in order): the state and
messages are the worker's, only Kafka is left out, so the counts are exact and the run takes seconds.
"""

from __future__ import annotations

import math
import random
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pymk.datasets import load_edge_history
from pymk.events import UserEvent
from pymk.features.activity import DAY_MS, ActivityLeaderboard
from pymk.features.graph import DegreeUpdate, PartitionGraph
from pymk.features.keyspace import ADJACENCY, COMMON, MIRROR, REVERSE
from pymk.features.storage import DictRowStore, row_user
from pymk.index.ann import AnnConfig
from pymk.index.records import EmbeddingRecord
from pymk.paths import bundled_data
from pymk.streams.codec import degree_record, encode_partition_batches, profile_record
from pymk.streams.partitioning import partition_for_user
from pymk.synthetic import SyntheticConfig, synthetic_network

DEFAULT_GRAPHS = (bundled_data("ego-facebook/facebook_combined.txt.gz"), bundled_data("ca-hepph/CA-HepPh.txt.gz"))
DEFAULT_PARTITIONS = 12
KINDS = {ADJACENCY: "adjacency", MIRROR: "mirror", REVERSE: "reverse", COMMON: "common_neighbours"}


def degree_bucket(degree: int) -> int:
    """Powers of two: 1, 2, 4, 8, … (a bucket holds degrees [b, 2b))."""
    return 1 << max(0, degree.bit_length() - 1)


class _Cluster:
    def __init__(self, partitions: int, materialise_common: bool = True) -> None:
        self.partitions = partitions
        self._owner: dict[int, int] = {}
        self.graphs = [PartitionGraph(p, partitions, DictRowStore(), self.partition_of,
                                      materialise_common=materialise_common) for p in range(partitions)]
        self.message_bytes = 0
        self.messages = 0

    def partition_of(self, user: int) -> int:
        owner = self._owner.get(user)
        if owner is None:
            owner = self._owner[user] = partition_for_user(user, self.partitions)
        return owner

    def connect(self, src: int, dst: int, ts: int) -> None:
        """Apply a connection at its source's partition and deliver every message it causes, as the topic would."""
        queue: list[tuple[int, int]] = [(self.partition_of(src), -1)]
        self.graphs[queue[0][0]].apply_connection(src, dst, "add", ts)
        while queue:
            source, _ = queue.pop()
            outbox, _degrees = self.graphs[source].take_outbox()
            for target, batch in outbox.items():
                self.messages += len(batch)
                self.message_bytes += sum(len(raw) for raw in encode_partition_batches(source, batch))
                for message in batch:
                    self.graphs[target].apply_message(message)
                queue.append((target, -1))

    def counters(self) -> tuple[int, int, int]:
        stats = [g.stats for g in self.graphs]
        return (sum(s.pair_updates + s.two_hop_marks for s in stats), sum(s.mirror_changes for s in stats),
                sum(s.edge_changes for s in stats))

    def flush(self) -> None:
        """What the worker's flush does with the graph's rows: encode the dirty ones and write them."""
        for graph in self.graphs:
            graph.flush()


FLUSH_EVERY = 200  # connection events between two flushes of the replay (a worker flushes every ~500 ms)


def _graph_state(path: Path, partitions: int, materialise_common: bool = True) -> dict[str, Any]:
    """``materialise_common``: the common-neighbour counts as rows (PYMK_COMMON_COUNTS=materialised) or read on
    demand (on-read: no C rows; the replay then counts each 2-path change as a mark of the user, not an update)."""
    history = load_edge_history(path)
    cluster = _Cluster(partitions, materialise_common)
    degree: dict[int, int] = defaultdict(int)
    per_event: dict[int, list[tuple[int, int, int, int]]] = defaultdict(list)  # bucket → (pairs, mirror, msgs, bytes)
    started = time.perf_counter()
    for event_number, (src, dst, ts) in enumerate(history.connections, start=1):
        if event_number % FLUSH_EVERY == 0:  # a touched C row is re-encoded whole at each flush: part of its cost
            cluster.flush()
        before = cluster.counters()
        messages, message_bytes = cluster.messages, cluster.message_bytes
        cluster.connect(src, dst, ts)
        after = cluster.counters()
        endpoints = degree[src] + degree[dst]  # before the event
        per_event[degree_bucket(endpoints + 1)].append((after[0] - before[0], after[1] - before[1],
                                                        cluster.messages - messages,
                                                        cluster.message_bytes - message_bytes))
        degree[src] += 1
        degree[dst] += 1
    cluster.flush()
    replay_s = time.perf_counter() - started
    by_user: dict[int, dict[str, int]] = defaultdict(lambda: dict.fromkeys(KINDS.values(), 0))
    entries: dict[str, int] = dict.fromkeys(KINDS.values(), 0)
    for graph in cluster.graphs:
        assert isinstance(graph.store, DictRowStore)
        puts = graph.store.data
        for key, value in puts.items():
            kind = KINDS.get(key[:1])
            if kind is None:
                continue
            by_user[row_user(key)][kind] += len(key) + len(value)
        for key in puts:  # entries, for the bytes per entry
            if key[:1] == COMMON:
                entries["common_neighbours"] += len(graph.common_row(row_user(key)))
            elif key[:1] == ADJACENCY:
                entries["adjacency"] += len(graph.adjacency_row(row_user(key)).versions)
            elif key[:1] == MIRROR:
                entries["mirror"] += len(graph.mirror_row(row_user(key)).versions)
    users = sorted(degree)
    total = {kind: sum(by_user[u][kind] for u in users) for kind in KINDS.values()}
    buckets: dict[int, list[int]] = defaultdict(list)
    for user in users:
        buckets[degree_bucket(degree[user])].append(user)
    bytes_by_degree = []
    for bucket in sorted(buckets):
        members = buckets[bucket]
        row = {"degree_from": bucket, "degree_to": 2 * bucket - 1, "users": len(members),
               "mean_degree": round(float(np.mean([degree[u] for u in members])), 1)}
        for kind in KINDS.values():
            row[kind] = round(float(np.mean([by_user[u][kind] for u in members])))
        row["total"] = sum(row[kind] for kind in KINDS.values())
        bytes_by_degree.append(row)
    work_by_degree = []
    for bucket in sorted(per_event):
        rows = np.asarray(per_event[bucket], dtype=np.float64)
        work_by_degree.append({"endpoint_degree_sum_from": bucket - 1, "endpoint_degree_sum_to": 2 * bucket - 2,
                               "events": len(rows), "common_neighbour_updates": round(float(rows[:, 0].mean()), 1),
                               "mirror_register_changes": round(float(rows[:, 1].mean()), 1),
                               "partition_messages": round(float(rows[:, 2].mean()), 2),
                               "partition_message_bytes": round(float(rows[:, 3].mean()))})
    degrees = np.asarray([degree[u] for u in users], dtype=np.float64)
    pairs_total = sum(e[0] for rows in per_event.values() for e in rows)
    return {
        "graph": Path(path).name, "users": len(users), "edges": len(history.connections), "partitions": partitions,
        "degree": {"mean": round(float(degrees.mean()), 2), "max": int(degrees.max()),
                   "second_moment_over_mean": round(float((degrees ** 2).mean() / degrees.mean()), 1)},
        "bytes_per_user": {kind: round(total[kind] / len(users)) for kind in KINDS.values()}
                          | {"total": round(sum(total.values()) / len(users))},
        "common_counts": "materialised" if materialise_common else "on-read",
        "bytes_per_entry": {kind: round(total[kind] / entries[kind], 2) if entries[kind] else None
                            for kind in ("adjacency", "mirror", "common_neighbours")},
        "common_neighbour_entries_per_user": round(entries["common_neighbours"] / len(users), 1),
        "mirror_copies_per_adjacency_entry": round(entries["mirror"] / max(1, entries["adjacency"]), 3),
        "per_connection_event": {"common_neighbour_updates": round(pairs_total / len(history.connections), 1),
                                 "partition_messages": round(cluster.messages / len(history.connections), 2),
                                 "partition_message_bytes": round(cluster.message_bytes / len(history.connections))},
        "bytes_by_degree": bytes_by_degree,
        "work_by_degree": work_by_degree,
        "replay_seconds": round(replay_s, 2),
        "connection_events_per_second_in_process": round(len(history.connections) / replay_s),
    }


def _per_user_records(ann: AnnConfig, n_vectors: int = 20_000, seed: int = 0) -> dict[str, Any]:
    import faiss

    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n_vectors, 128)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = faiss.IndexHNSWFlat(128, ann.m, faiss.METRIC_INNER_PRODUCT)
    index.add(vectors)
    hnsw_bytes = len(faiss.serialize_index(index))
    record = EmbeddingRecord(123_456_789, 3, 1_700_000_000_000, "sage-20261127153821-81018a11", vectors[0])
    events = synthetic_network(SyntheticConfig(n_users=500, seed=seed))
    profile_bytes = []
    for event in events:
        if isinstance(event, UserEvent):
            fields = event.profile.to_dict()
            key, value = profile_record(event.user, fields, dict.fromkeys(fields, event.ts))
            profile_bytes.append(len(key) + len(value))
    key, value = degree_record(DegreeUpdate(123_456_789, 190, 2 * 1_700_000_000_000, 1_700_000_000_000,
                                            1_700_000_000_000, (0.5, 1.2, 3.4)))
    return {
        "embedding_record_bytes": len(record.encode()),
        "hnsw_bytes_per_vector": round(hnsw_bytes / n_vectors, 1),
        "hnsw_m": ann.m,
        "user_globals_degree_record_bytes": len(key) + len(value),
        "user_globals_profile_record_bytes": round(float(np.mean(profile_bytes))) if profile_bytes else None,
        "synthetic_profiles_measured": len(profile_bytes),
    }


def _popular_query_cost(populations: Sequence[int] = (100_000, 1_000_000), k: int = 200, queries: int = 200,
                        seed: int = 0) -> dict[str, Any]:
    """The popular source's order on every worker (features/activity.py, ActivityLeaderboard): the cost of a
    query that follows an update (what each slice of lists pays while records arrive), and the board's bytes
    per user (its arrays and its id → slot dict, with the ids' int objects)."""
    out: dict[str, Any] = {"k": k, "queries": queries, "rows": []}
    for users in populations:
        rng = np.random.default_rng(seed)
        board = ActivityLeaderboard()
        weekly, anchor_days = rng.integers(1, 50, users).astype(float), rng.integers(0, 30, users)
        for user in range(users):
            board.update(user, (1.0, float(weekly[user]), 1.0), int(anchor_days[user]) * DAY_MS, 5)
        board.top(k)
        seconds = []
        for step in range(queries):  # each query after one user's newer activity (as records arrive)
            user = int(rng.integers(0, users))
            board.update(user, (1.0, float(rng.integers(1, 50)), 1.0), (30 + step) * DAY_MS, 6)
            started = time.perf_counter()
            board.top(k)
            seconds.append(time.perf_counter() - started)
        held = sum(column.nbytes for column in (board._ids, board._keys, board._degrees, board._versions))
        held += sys.getsizeof(board._slot)
        held += sum(sys.getsizeof(user) for user in board._slot)
        out["rows"].append({"users": users, "query_us_p50": round(1e6 * float(np.median(seconds)), 1),
                            "query_us_p99": round(1e6 * float(np.percentile(seconds, 99)), 1),
                            "full_scans": board.full_scans, "leaders": len(board._leaders),
                            "bytes_per_user": round(held / users, 1)})
    return out


def bench_capacity(graphs: Sequence[Path] = DEFAULT_GRAPHS, partitions: int = DEFAULT_PARTITIONS,
                   ann: AnnConfig | None = None, lists_per_core_second: float = 300.0,
                   plot: Path | None = None) -> dict[str, Any]:
    """The measurements, and the projections of :func:`project` at 10⁸ and 10⁹ users, 10⁴ and 10⁵ events/s.
    ``lists_per_core_second``: the list cost to project with (``pymk bench rank``'s, an input of the plan)."""
    random.seed(0)
    measured: dict[str, Any] = {
        "bench": "capacity",
        "graphs": [_with_on_read(_graph_state(Path(g), partitions), _graph_state(Path(g), partitions, False))
                   for g in graphs],
        "per_user_records": _per_user_records(ann or AnnConfig()),
        "popular_order": _popular_query_cost(),
        "note": "RocksDB bytes are encoded key + value before RocksDB's compression; see docs/capacity.md"}
    measured["projection"] = {
        "lists_per_core_second": lists_per_core_second, "machine": MACHINE,
        "target_degree": {"median": TARGET_MEDIAN_DEGREE, "sigma": TARGET_DEGREE_SIGMA, "cap": TARGET_DEGREE_CAP},
        "rows": [project(measured, users, rate, partitions_at, lists_per_core_second, cap, sharded)
                 for cap, sharded in ((None, False), (ON_READ, False), (BOUNDED_COMMON_NEIGHBOURS, True),
                                      (ON_READ, True))
                 for users, partitions_at in ((1e8, 1024), (1e9, 4096)) for rate in (1e4, 1e5)]}
    if plot is not None:
        plot_capacity(measured, plot)
    return measured


def _with_on_read(materialised: dict[str, Any], on_read: dict[str, Any]) -> dict[str, Any]:
    """The graph measured with materialised rows, and what the same replay costs with counts read on demand."""
    return materialised | {"on_read": {
        "bytes_per_user": on_read["bytes_per_user"],
        "two_hop_marks_per_connection_event": on_read["per_connection_event"]["common_neighbour_updates"],
        "replay_seconds": on_read["replay_seconds"],
        "connection_events_per_second_in_process": on_read["connection_events_per_second_in_process"],
        "bytes_by_degree": on_read["bytes_by_degree"]}}


def plot_capacity(measured: dict[str, Any], path: Path) -> None:
    """Bytes per user by store, and work per connection event, against degree (log-log), one line per graph."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for graph in measured["graphs"]:
        rows = graph["bytes_by_degree"]
        x = [r["mean_degree"] for r in rows]
        for kind, style in (("total", "-"), ("common_neighbours", "--"), ("mirror", ":")):
            left.plot(x, [r[kind] for r in rows], style, marker="o", ms=3, label=f"{graph['graph']}: {kind}")
        work = graph["work_by_degree"]
        wx = [(w["endpoint_degree_sum_from"] + w["endpoint_degree_sum_to"]) / 2 + 1 for w in work]
        right.plot(wx, [w["common_neighbour_updates"] for w in work], "-", marker="o", ms=3,
                   label=f"{graph['graph']}: common-neighbour updates")
        right.plot(wx, [w["partition_messages"] for w in work], ":", marker="o", ms=3,
                   label=f"{graph['graph']}: messages between partitions")
    left.set(xscale="log", yscale="log", xlabel="degree", ylabel="bytes per user (RocksDB rows)",
             title="State per user against degree")
    right.set(xscale="log", yscale="log", xlabel="deg x + deg y before the event", ylabel="per connection event",
              title="Work per connection event against degree")
    for axis in (left, right):
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def expected_two_hop(mean_degree: float, second_moment_over_mean: float) -> float:
    """2-paths from a user of mean degree: d · (E[k²]/E[k] − 1) (an upper bound on distinct 2-hop users)."""
    return mean_degree * max(0.0, second_moment_over_mean - 1.0)




# ---- projection ----------------------------------------------------------------------------------------------------
# The target network and hardware the plan is stated for (docs/capacity.md says why these).
TARGET_MEDIAN_DEGREE = 100.0  # a large professional network: median ~100, mean ~165, capped like LinkedIn's 30,000
TARGET_DEGREE_SIGMA = 1.0
TARGET_DEGREE_CAP = 30_000
CONNECTION_SHARE = 0.2  # of the input events (the rest: views, engagements, dismissals, profile edits)
USERS_TOUCHED_PER_EVENT = 1.5  # lists owed per event (pymk bench freshness: both ends of a connection or view)
MACHINE = {"cores": 32, "ram_gb": 256, "disk_tb": 4}
BOUNDED_COMMON_NEIGHBOURS = 1000  # top-K common-neighbour entries kept per user (Stage 1 takes 1,000 from the graph)
ON_READ = 0  # a cap of 0 entries: the counts are read on demand (PYMK_COMMON_COUNTS=on-read, built)


def project(measured: dict[str, Any], users: float, events_per_s: float, partitions: int,
            lists_per_core_second: float, common_neighbour_cap: int | None = None,
            sharded: bool = False) -> dict[str, Any]:
    """Bytes, work and machines for ``users`` at ``events_per_s``, from the measured per-entry costs and the
    target degree distribution (expected values over it, computed numerically). Today's structures by default;
    ``common_neighbour_cap`` (top-K rows) and ``sharded`` (each worker indexes and keeps user-globals only for
    its own partitions' users) project the bounded ones of issue #23 from the same measured costs."""
    graphs = measured["graphs"]
    records = measured["per_user_records"]
    b_adj = max(g["bytes_per_entry"]["adjacency"] for g in graphs)
    b_cn = max(g["bytes_per_entry"]["common_neighbours"] or 0.0 for g in graphs)
    b_rev = max(g["bytes_per_user"]["reverse"] / g["degree"]["mean"] for g in graphs)
    # distinct 2-hop users per 2-path (clustering folds paths onto the same users): the largest measured
    overlap = max(g["common_neighbour_entries_per_user"]
                  / expected_two_hop(g["degree"]["mean"], g["degree"]["second_moment_over_mean"]) for g in graphs)
    k = np.arange(1, TARGET_DEGREE_CAP + 1, dtype=np.float64)
    mu = math.log(TARGET_MEDIAN_DEGREE)
    density = np.exp(-((np.log(k) - mu) ** 2) / (2 * TARGET_DEGREE_SIGMA**2)) / k
    density /= density.sum()
    mean = float((density * k).sum())
    friend_degree = float((density * k * k).sum()) / mean  # E[k²]/E[k]: a neighbour's expected degree
    copies = (partitions - 1) * (1 - (1 - 1 / partitions) ** k)  # other partitions holding a neighbour
    two_hop = np.minimum(overlap * k * (friend_degree - 1), users)
    if common_neighbour_cap is not None:
        two_hop = np.minimum(two_hop, common_neighbour_cap)
    per_user = {"adjacency": float((density * k).sum() * b_adj),
                "mirror": float((density * copies * k).sum() * b_adj),
                "reverse": mean * b_rev,
                "common_neighbours": float((density * two_hop).sum() * b_cn)}
    disk_total = users * sum(per_user.values())
    every_worker = users * (records["hnsw_bytes_per_vector"] + records["user_globals_degree_record_bytes"]
                            + (records["user_globals_profile_record_bytes"] or 0))
    on_read = common_neighbour_cap == ON_READ
    if on_read:  # the same 2-path changes, each only a mark of the user: measured by the on-read replay
        cn_rate = max(g["on_read"]["two_hop_marks_per_connection_event"]
                      * g["on_read"]["connection_events_per_second_in_process"] for g in graphs)
    else:  # pair updates per core-second, in-process, the flushes' row rewrites included
        cn_rate = max(g["per_connection_event"]["common_neighbour_updates"]
                      * g["connection_events_per_second_in_process"] for g in graphs)
    pair_updates = events_per_s * CONNECTION_SHARE * 4 * friend_degree  # 2·(deg x + deg y), endpoints ∝ degree
    lists = events_per_s * USERS_TOUCHED_PER_EVENT
    cores = {"common_neighbour_maintenance": pair_updates / cn_rate, "lists": lists / lists_per_core_second}
    ram_budget = MACHINE["ram_gb"] * 1e9 * 0.5  # half the RAM: the rest is RocksDB's cache, rows, the process
    machines_by = {"disk": disk_total / (MACHINE["disk_tb"] * 1e12),
                   "cores": sum(cores.values()) / MACHINE["cores"]}
    if sharded:
        machines_by["ram"] = every_worker / ram_budget
    elif every_worker > ram_budget:
        machines_by["ram"] = math.inf  # every worker holds it all: no number of machines is enough
    return {
        "design": ("today" if common_neighbour_cap is None and not sharded
                   else ("on-read" if on_read else "bounded") + ("+sharded" if on_read and sharded else "")),
        "common_counts": "on-read" if on_read else "materialised",
        "common_neighbour_cap": common_neighbour_cap, "sharded_index": sharded,
        "users": users, "events_per_s": events_per_s, "partitions": partitions,
        "degree": {"mean": round(mean, 1), "neighbour_mean": round(friend_degree, 1)},
        "bytes_per_user": {name: round(v) for name, v in per_user.items()} | {"total": round(sum(per_user.values()))},
        "disk_total_tb": round(disk_total / 1e12, 1),
        "index_and_globals_gb": round(every_worker / 1e9, 1),  # on every worker today, split across them if sharded
        "index_and_globals_fit_one_worker": every_worker <= ram_budget,
        "pair_updates_per_s": round(pair_updates), "lists_per_s": round(lists),
        "cores": {name: round(v, 1) for name, v in cores.items()},
        "machines": {name: (math.ceil(v) if math.isfinite(v) else None) for name, v in machines_by.items()} | {
            "needed": (math.ceil(max(machines_by.values())) if math.isfinite(max(machines_by.values())) else None),
            "bound_by": max(machines_by, key=lambda name: machines_by[name])},
    }
