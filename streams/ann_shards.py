"""Stage 1's ANN over an index sharded by partition (``PYMK_ANN_MODE=sharded``): the shard search every worker
answers on its web server (``POST /ann/shard``), and the scatter-gather of the worker that ranks.

A worker's HNSW graph holds its own partitions' users (streams/global_index.py). Before the synchronous ranking
of a slice of owed lists, :meth:`ShardedAnn.prefetch` asks every shard for those users' top k at once — one
request per peer with every query of the slice, and the local shard — and awaits the answers together with a
timeout, so the event loop keeps serving the peers' own requests meanwhile (a synchronous call inside the flush
would deadlock two workers that query each other). Each query's hits are merged by score, ties by id
(:func:`pymk.index.ann.merge_top_k_arrays`), and ranking reads them through :meth:`ShardedAnn.ann`.
The gather is awaited with the state's lock released, between flushes (``WorkerState.refresh_now``) and before a
flush's commit (``WorkerState._gather_for_flush``), so ingest does not wait for the slowest peer; each answer
carries the query vector and exclusions it was asked with, and :meth:`ShardedAnn.ann` serves it only while they
still hold (exclusions may have grown: the hits are filtered and the ANN_SPARES asked past ann_k fill in) — else
:class:`AnnNotGathered`, and that list waits for the next slice.

A peer that does not answer in time: the lists are built from the shards that did (waiting would stall every
list of every worker for as long as the group takes to notice a dead member: its session timeout), and
``/stats`` ``ann_shards`` counts the searches that lacked partitions (``partial_searches``,
``missing_partitions``). The shard search runs on the event loop (the index is not thread-safe: the owner
upserts into it on the loop, and a search clears exclusion bits for its duration), one query at a time with a
yield every ``SEARCH_SLICE_S``, so a peer's batch never holds the loop longer than that plus one query.

Wire format: ``np.savez`` archives (no pickle), so vectors and scores cross exactly.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pymk.index.ann import AnnIndex, merge_top_k_arrays, shard_k, truncated_shards
from pymk.ranking.source import SourceNotReady

log = logging.getLogger(__name__)

SHARD_PATH = "/ann/shard"
SEARCH_SLICE_S = 0.005  # a shard search yields the event loop this often (between two queries)

Hits = list[tuple[int, float]]
# (url, request body, timeout in seconds) → answer body; raises on failure
PostBytes = Callable[[str, bytes, float], Awaitable[bytes]]


# ---- wire ---------------------------------------------------------------------------------------------------------
def _archive(**arrays: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.savez(out, **arrays)  # type: ignore[arg-type]
    return out.getvalue()


def _unarchive(body: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(body), allow_pickle=False) as held:
        return {name: np.asarray(held[name]) for name in held.files}


def encode_request(queries: np.ndarray, k: int, excludes: Sequence[Collection[int]]) -> bytes:
    lengths = np.fromiter(map(len, excludes), np.int64, len(excludes))
    flat = np.fromiter((u for exclude in excludes for u in exclude), np.int64, int(lengths.sum()))
    return _archive(queries=np.asarray(queries, np.float32), k=np.array(k, np.int64),
                    exclude_lengths=lengths, exclude_ids=flat)


def decode_request(body: bytes) -> tuple[np.ndarray, int, list[np.ndarray]]:
    held = _unarchive(body)
    bounds = np.concatenate([[0], np.cumsum(held["exclude_lengths"])])
    ids = held["exclude_ids"]
    excludes = [ids[bounds[i]:bounds[i + 1]] for i in range(len(held["exclude_lengths"]))]
    return held["queries"].astype(np.float32), int(held["k"]), excludes


def encode_answer(ids: np.ndarray, scores: np.ndarray, partitions: Collection[int]) -> bytes:
    return _archive(ids=ids, scores=scores, partitions=np.fromiter(partitions, np.int64, len(partitions)))


def decode_answer(body: bytes) -> tuple[np.ndarray, np.ndarray, set[int]]:
    held = _unarchive(body)
    return held["ids"], held["scores"], set(held["partitions"].tolist())


def hits_of(ids: np.ndarray, scores: np.ndarray) -> Hits:
    """One query's row of an answer (padded with -1) as (user, score) pairs."""
    keep = ids >= 0
    return list(zip(ids[keep].tolist(), scores[keep].tolist(), strict=True))


# ---- the shard search (server side) -----------------------------------------------------------------------------
async def search_shard(index: AnnIndex, queries: np.ndarray, k: int, excludes: Sequence[Collection[int]],
                       slice_s: float = SEARCH_SLICE_S) -> tuple[np.ndarray, np.ndarray]:
    """Each query's top k in this shard: ids int64 [n, k] padded with -1, scores float64 [n, k] padded with -inf.
    On the event loop, yielding every ``slice_s`` (module doc)."""
    n = len(queries)
    ids = np.full((n, k), -1, np.int64)
    scores = np.full((n, k), -np.inf, np.float64)
    started = time.perf_counter()
    for row in range(n):
        hits = index.search(queries[row], k, excludes[row])
        ids[row, : len(hits)] = [user for user, _ in hits]
        scores[row, : len(hits)] = [score for _, score in hits]
        if time.perf_counter() - started >= slice_s:
            await asyncio.sleep(0)
            started = time.perf_counter()
    return ids, scores


# ---- the scatter-gather (client side) ---------------------------------------------------------------------------
@dataclass
class ShardStats:
    """``/stats`` ``ann_shards``."""

    gathers: int = 0  # scatter-gathers (one per prefetch with something to ask)
    queries: int = 0  # users asked for
    peer_requests: int = 0
    peer_failures: int = 0  # requests that failed or timed out
    partial_searches: int = 0  # gathers that lacked some partition's shard (their lists built without it)
    missing_partitions: tuple[int, ...] = ()  # of the last gather
    # ANN asked by ranking that the gathered answers do not answer (the user's vector or exclusions moved while
    # the gather was awaited, or it was not asked): that list waits for the next slice (AnnNotGathered)
    prefetch_misses: int = 0
    gather_seconds: float = 0.0  # summed wall time of the gathers
    merge_seconds: float = 0.0  # of which merging the shards' answers
    shard_k: int = 0  # hits asked of each shard in the last gather's first round (shard_k)
    second_rounds: int = 0  # gathers that asked some shard again for the full k (truncated_shards)
    queries_asked_again: int = 0  # (shard, query) pairs asked again
    last_gather_ms: float = 0.0


@dataclass(frozen=True)
class Prefetched:
    exclude: frozenset[int]
    k: int
    hits: Hits
    complete: bool  # every partition's shard answered
    vector: np.ndarray | None  # the query vector asked with (None: the user had none)


class AnnNotGathered(SourceNotReady):
    """Ranking asked the ANN a question the gathered answers do not answer: the list waits for the next slice."""


Gathered = dict[int, Prefetched]


class ShardedAnn:
    """The ranking worker's side: gathers the shards' answers for a slice's users, then serves them to Stage 1.

    ``local``: this worker's shard (its GlobalIndex; the query vectors come from its replicated vector store);
    ``peers()``: the other workers' URLs; ``post``: one HTTP POST (the worker's aiohttp client)."""

    def __init__(self, local: Any, partitions: int, peers: Callable[[], Sequence[str]], post: PostBytes,
                 timeout_s: float, sigmas: float = 0.0) -> None:
        self.local = local
        self.partitions = partitions
        self.peers = peers
        self.post = post
        self.timeout_s = timeout_s
        self.sigmas = sigmas  # the first round's margin (shard_k); 0: every shard asked for the full k
        self.ready: Gathered = {}
        self.stats = ShardStats()

    async def _ask(self, url: str | None, queries: np.ndarray, k: int, excludes: Sequence[Collection[int]]
                   ) -> tuple[np.ndarray, np.ndarray, set[int]] | None:
        """One shard's answer (None: the local one); None when a peer failed or timed out."""
        if url is None:
            ids, scores = await search_shard(self.local.index, queries, k, excludes)
            return ids, scores, set(self.local.graph_partitions)
        self.stats.peer_requests += 1
        try:
            return decode_answer(await self.post(url + SHARD_PATH, encode_request(queries, k, excludes),
                                                 self.timeout_s))
        except Exception as exc:  # noqa: BLE001 - a dead or slow peer: its partitions are missing
            log.warning("ANN shard %s did not answer: %s", url, exc)
            self.stats.peer_failures += 1
            return None

    async def search(self, queries: np.ndarray, k: int, excludes: Sequence[Collection[int]]
                     ) -> tuple[list[Hits], set[int]]:
        """Each query's merged top k over every shard that answered, and the partitions no shard answered for.

        Each shard is first asked for :func:`shard_k` of the k (its likely share of the global top k, with
        ``sigmas`` standard deviations of margin); a shard whose cut may hide a user of a query's merged top k
        (:func:`truncated_shards`) is asked again for that query's full k. With exact shard searches the answer
        is the exact global top k either way; the first round only makes it cheaper."""
        started = time.perf_counter()
        # the peers first: their requests are on the wire before the local search takes the loop (it yields only
        # every SEARCH_SLICE_S)
        shards: list[str | None] = [*self.peers(), None]
        n = len(queries)
        asked = shard_k(k, len(shards), self.sigmas)
        first = await asyncio.gather(*(self._ask(url, queries, asked, excludes) for url in shards))
        # per query, per shard that answered: its (ids, scores) row
        answered = [(url, answer) for url, answer in zip(shards, first, strict=True) if answer is not None]
        rows = [[(answer[0][row], answer[1][row]) for _, answer in answered] for row in range(n)]
        covered = set().union(*(answer[2] for _, answer in answered))
        merge_started = time.perf_counter()
        merged = [merge_top_k_arrays([i for i, _ in rows[row]], [x for _, x in rows[row]], k) for row in range(n)]
        self.stats.merge_seconds += time.perf_counter() - merge_started
        if asked < k:
            again: dict[int, list[int]] = {}  # shard position (in answered) → the queries to ask it again
            for row in range(n):
                counts = [int((ids >= 0).sum()) for ids, _ in rows[row]]
                lasts = [float(scores[count - 1]) if count else -np.inf
                         for (_, scores), count in zip(rows[row], counts, strict=True)]
                for shard in truncated_shards(counts, lasts, asked, merged[row][1], k):
                    again.setdefault(shard, []).append(row)
            if again:
                self.stats.second_rounds += 1
                self.stats.queries_asked_again += sum(map(len, again.values()))
                seconds = await asyncio.gather(*(
                    self._ask(answered[shard][0], queries[asked_rows], k, [excludes[row] for row in asked_rows])
                    for shard, asked_rows in again.items()))
                for (shard, asked_rows), answer in zip(again.items(), seconds, strict=True):
                    if answer is None:  # the cut answer stays; its partitions count as missing (not exact)
                        covered -= answered[shard][1][2]
                        continue
                    for position, row in enumerate(asked_rows):
                        rows[row][shard] = (answer[0][position], answer[1][position])
                for row in sorted({row for asked_rows in again.values() for row in asked_rows}):
                    merged[row] = merge_top_k_arrays([i for i, _ in rows[row]], [x for _, x in rows[row]], k)
        missing = set(range(self.partitions)) - covered
        seconds_spent = time.perf_counter() - started
        self.stats.gathers += 1
        self.stats.queries += n
        self.stats.shard_k = asked
        self.stats.partial_searches += bool(missing)
        self.stats.missing_partitions = tuple(sorted(missing))
        self.stats.gather_seconds += seconds_spent
        self.stats.last_gather_ms = round(1000 * seconds_spent, 3)
        return [list(zip(ids.tolist(), scores.tolist(), strict=True)) for ids, scores in merged], missing

    async def gather(self, wanted: Sequence[tuple[int, frozenset[int]]], k: int) -> Gathered:
        """The ANN answers of these (user, excluded users) for ``k``, each with the query vector it was asked with.
        A user without a vector gets none (as with one index). Reads the vectors first, then only awaits: the
        caller need not hold the state's lock while it waits (streams/state.py, ``refresh_now``)."""
        gathered: Gathered = {}
        asked = [(user, exclude, vector) for user, exclude in wanted
                 if (vector := self.local.vector(user)) is not None]
        for user, exclude in wanted:
            gathered[user] = Prefetched(exclude, k, [], True, None)
        if not asked:
            return gathered
        # the user itself is always excluded (as AnnIndex.search is asked by GlobalIndex.neighbours)
        excludes = [exclude | {user} for user, exclude, _ in asked]
        vectors = np.stack([vector for _, _, vector in asked]).astype(np.float32)  # a copy: the store moves on
        merged, missing = await self.search(vectors, k, excludes)
        for row, ((user, _, _), exclude, hits) in enumerate(zip(asked, excludes, merged, strict=True)):
            gathered[user] = Prefetched(frozenset(exclude), k, hits, not missing, vectors[row])
        return gathered

    async def prefetch(self, wanted: Sequence[tuple[int, frozenset[int]]], k: int) -> None:
        """:meth:`gather`, ready for :meth:`ann` until :meth:`clear`."""
        self.ready = await self.gather(wanted, k)

    def ann(self, user: int, k: int, exclude: Collection[int]) -> Hits:
        """Stage 1's ANN (``WorkerRankingSource.ann``): the gathered answer when it answers this question (asked
        with the user's vector as it is now, with no more exclusions, for at least k or all there were); else
        :class:`AnnNotGathered` — the list waits for the next slice's gather rather than being ranked from the
        local shard alone (a third of the users at 3 workers)."""
        held = self.ready.get(user)
        if held is not None and held.exclude <= ({user} | set(exclude)) and self._same_vector(user, held):
            hits = [hit for hit in held.hits if hit[0] not in exclude]
            if len(hits) >= k or len(held.hits) < held.k:
                return hits[:k]
        self.stats.prefetch_misses += 1
        raise AnnNotGathered(f"user {user}: no gathered ANN answer for its vector and exclusions now")

    def _same_vector(self, user: int, held: Prefetched) -> bool:
        vector = self.local.vector(user)
        if vector is None or held.vector is None:
            return vector is None and held.vector is None
        return bool(np.array_equal(np.asarray(vector, np.float32), held.vector))

    def clear(self) -> None:
        self.ready = {}

    def describe(self) -> dict[str, Any]:
        return asdict(self.stats)
