"""A FAISS HNSW index of user embeddings that follows the stream: users are added, replaced and deleted.

Pure code (no Kafka): the worker calls :meth:`AnnIndex.upsert` when GraphSAGE emits embeddings, and
:meth:`AnnIndex.search` to generate candidates.

Why it is built this way:

* **FAISS HNSW cannot delete.** Every added vector gets a fresh internal *slot* (its FAISS label is the slot
  number, because FAISS numbers additions 0, 1, 2, …). ``user → slot`` is a dict and ``slot → user`` an int64
  array, so user ids may be any non-negative int64, contiguous or not. Replacing or deleting a user turns its
  old slot into a *tombstone*: the vector stays in the HNSW graph (it still routes searches) but is never a
  result.
* **Tombstones are filtered inside the search**, by an ``IDSelectorBitmap`` over a live-slot bitmap passed
  through ``SearchParametersHNSW``. Filtering afterwards would return fewer than k results. Excluded users
  (the query user and their connections) have their bits cleared for the duration of the search, so they are
  filtered the same way. When a restrictive filter still leaves the beam short of k eligible results, the
  search retries with a wider beam and finally falls back to brute force: k results come back whenever k
  eligible users exist.
* **Rebuild.** Once tombstones reach ``rebuild_tombstone_fraction`` of the slots, a new HNSW is built from the
  live vectors (slots renumbered 0..live-1). With fraction f a replacement-only stream rebuilds after
  ``f/(1-f)·live`` replacements, so each replacement costs ``1 + (1-f)/f`` HNSW insertions amortised
  (5 at f=0.2): the price of bounded memory and of search quality not degrading behind dead nodes.
* **Scores are exact.** With ``keep_vectors`` the index keeps its own float32 copy of every slot's vector
  (numpy, grown geometrically) and re-scores HNSW's candidates against the user's *current* vector. With SQ8
  storage it over-fetches ``sq8_rerank_factor·k`` candidates first, because quantised scores misorder
  near-ties. The copy is also the source for rebuilds and snapshots, so SQ8 rebuilds do not re-quantise
  already-quantised vectors.
* **SQ8 is trained on the fixed range [-1, 1]** (``QT_8bit_uniform``), not on data: vectors are unit-norm so
  every component lies in [-1, 1] and nothing is ever clipped; the index works from the first vector (no
  waiting for N training vectors); a retrained GraphSAGE, whose embeddings move, cannot invalidate the range;
  and decode → encode is the identity on codes, so even without the float copy a rebuild does not compound
  quantisation error. The price is resolution: a step of 2/255 ≈ 0.008 while a 128-d unit vector's components
  have a spread of about 1/√128 ≈ 0.09 (pymk.bench.ann measures the recall; re-ranking recovers it).

Memory per slot (dim 128, M 32): HNSW graph ≈ 2·M·4 = 256 B at level 0 (+~5% upper levels); storage 512 B
(flat) or 128 B (sq8); the float copy 512 B (``keep_vectors``; up to 2× that transiently while the array
grows); slot → user 8 B and live flags ≈ 1.1 B; plus ≈ 100 B per *live* user for the Python dict. So 1 M users
take ≈ 1.4 GB flat with the copy, ≈ 0.9 GB flat without it (flat storage already holds exact vectors: the copy
only buys speed, so ``keep_vectors=False`` is a sound choice for flat), ≈ 1.0 GB sq8 with the copy and
≈ 0.5 GB sq8 without it (then scores are the quantised ones, with errors of about 0.002).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from itertools import repeat
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import faiss
import numpy as np

if TYPE_CHECKING:
    from pymk.settings import Settings

log = logging.getLogger(__name__)

Quantization = Literal["flat", "sq8"]

# Components of unit vectors lie in [-1, 1]; the SQ8 range (see the module docstring).
SQ8_RANGE = (-1.0, 1.0)
# How far a vector's norm may be from 1: inner products are only cosine similarities for unit vectors, and the
# fixed SQ8 range assumes them. Loose enough for float32 round-off of a normalisation done elsewhere.
UNIT_NORM_TOLERANCE = 1e-3

SNAPSHOT_FORMAT = 1
SNAPSHOT_PREFIX = "snapshot-"
TEMP_PREFIX = ".tmp-snapshot-"
INDEX_FILE = "index.faiss"
STATE_FILE = "state.npz"
ARRAYS_FILE = "arrays.npz"  # the owner's extra arrays (snapshot(arrays=...)), committed with the index
MANIFEST_FILE = "manifest.json"

# Config fields that only steer searches and rebuild timing: changing them needs no new HNSW graph.
SEARCH_TIME_FIELDS = frozenset({"ef_search", "rebuild_tombstone_fraction", "sq8_rerank_factor"})


@dataclass(frozen=True)
class AnnConfig:
    dim: int = 128
    m: int = 32  # HNSW neighbours per node (2·m at level 0)
    ef_construction: int = 200
    ef_search: int = 128  # beam width of a search; raised to the fetch size when k is larger
    quantization: Quantization = "flat"
    rebuild_tombstone_fraction: float = 0.2
    keep_vectors: bool = True
    # SQ8 with the float copy fetches this many times k candidates and re-scores them exactly.
    sq8_rerank_factor: float = 2.0
    # A search whose beam times this is at least the users it may return is answered by brute force over the kept
    # float vectors: the exact top k, and cheaper there than the graph walk (k = 1,000 over 100,000 unit vectors:
    # 3.0 ms against HNSW's 6.4, whose beam then visits a large part of the graph; docs/benchmarks.md). 0: always
    # the graph. Needs keep_vectors (without them brute force would decode every vector).
    exact_search_factor: int = 64

    def __post_init__(self) -> None:
        if self.dim <= 0 or self.m < 2 or self.ef_construction <= 0 or self.ef_search <= 0:
            raise ValueError(f"dim, m, ef_construction and ef_search must be positive (m ≥ 2): {self}")
        if self.quantization not in ("flat", "sq8"):
            raise ValueError(f"quantization must be 'flat' or 'sq8', got {self.quantization!r}")
        if not 0.0 < self.rebuild_tombstone_fraction <= 1.0:
            raise ValueError(f"rebuild_tombstone_fraction must be in (0, 1], got {self.rebuild_tombstone_fraction}")
        if self.sq8_rerank_factor < 1.0:
            raise ValueError(f"sq8_rerank_factor must be ≥ 1, got {self.sq8_rerank_factor}")
        if self.exact_search_factor < 0:
            raise ValueError(f"exact_search_factor must be ≥ 0, got {self.exact_search_factor}")

    def brute_force(self, eligible: int, beam: int) -> bool:
        """Whether a search with this beam over ``eligible`` users goes by brute force (see exact_search_factor)."""
        return self.keep_vectors and eligible <= self.exact_search_factor * beam


def ann_config(settings: Settings) -> AnnConfig:
    """The index's config from the settings: one place, so the worker, the evaluation and the benches search alike."""
    return AnnConfig(m=settings.ann_m, ef_construction=settings.ann_ef_construction, ef_search=settings.ann_ef_search,
                     quantization=settings.ann_quantization,
                     rebuild_tombstone_fraction=settings.ann_rebuild_tombstone_fraction,
                     exact_search_factor=settings.ann_exact_search_factor)


@dataclass(frozen=True)
class PendingRebuild:
    """A rebuild under way: the config and the copy of the live users and vectors its graph is built from."""

    config: AnnConfig
    users: np.ndarray
    vectors: np.ndarray


def set_threads(n: int) -> None:
    """Number of OpenMP threads FAISS uses (batch adds, rebuilds, batch searches); process-wide."""
    if n < 1:
        raise ValueError(f"thread count must be ≥ 1, got {n}")
    faiss.omp_set_num_threads(n)


def new_faiss_index(config: AnnConfig) -> faiss.IndexHNSW:
    """An empty, trained HNSW index for the config (inner-product metric)."""
    if config.quantization == "flat":
        index = faiss.IndexHNSWFlat(config.dim, config.m, faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexHNSWSQ(
            config.dim, faiss.ScalarQuantizer.QT_8bit_uniform, config.m, faiss.METRIC_INNER_PRODUCT
        )
        low, high = SQ8_RANGE
        # QT_8bit_uniform trains one min/max over all values: two vectors pin it to exactly [low, high].
        index.train(np.array([[low] * config.dim, [high] * config.dim], dtype=np.float32))
    index.hnsw.efConstruction = config.ef_construction
    index.hnsw.efSearch = config.ef_search
    return index


class AnnIndex:
    """Users' unit vectors, searchable by inner product, with replacement, deletion and snapshots.

    Not thread-safe (one asyncio thread owns it); FAISS itself may use OpenMP threads (:func:`set_threads`).
    """

    def __init__(self, config: AnnConfig | None = None) -> None:
        self._config = config or AnnConfig()
        self._index = new_faiss_index(self._config)
        self._slot_of: dict[int, int] = {}
        self._n_slots = 0
        self._tombstones = 0
        self._capacity = 0
        self._slot_users = np.empty(0, dtype=np.int64)
        self._live = np.empty(0, dtype=bool)
        # The same live flags packed little-endian, as IDSelectorBitmap reads them; kept in step with _live.
        self._bitmap = np.empty(0, dtype=np.uint8)
        self._vectors = np.empty((0, self._config.dim), dtype=np.float32)
        self.rebuilds = 0
        self.exact_fallbacks = 0  # searches the HNSW beam could not fill (see search)
        self.brute_force_searches = 0  # searches answered by brute force: few users for the beam (AnnConfig)
        # True: a rebuild is not done inline when tombstones reach the fraction; the owner sees rebuild_due() and
        # builds the new graph off its thread (begin_rebuild / build_graph / finish_rebuild)
        self.rebuild_in_background = False
        self._changed_during_rebuild: set[int] | None = None  # users upserted or deleted since begin_rebuild

    # ----------------------------------------------------------------------------------------- basics

    @property
    def config(self) -> AnnConfig:
        return self._config

    @property
    def n_slots(self) -> int:
        """Vectors in the HNSW graph, live or tombstoned."""
        return self._n_slots

    @property
    def tombstones(self) -> int:
        return self._tombstones

    def __len__(self) -> int:
        return len(self._slot_of)

    def __contains__(self, user: object) -> bool:
        return user in self._slot_of

    def users(self) -> np.ndarray:
        """The live users (int64), in slot order."""
        return self._slot_users[: self._n_slots][self._live[: self._n_slots]].copy()

    def get(self, user: int) -> np.ndarray | None:
        """The user's current vector (a copy; decoded from SQ8 when the float copy is not kept), or None."""
        slot = self._slot_of.get(int(user))
        if slot is None:
            return None
        return self._vectors_of(np.array([slot], dtype=np.int64))[0].copy()

    def get_many(self, users: Sequence[int]) -> np.ndarray:
        """(len(users), dim) float32: each user's current vector as :meth:`get` gives it, a row of NaN for a user
        without one. One gather, for Stage 2's thousand candidates."""
        slot_of = self._slot_of
        slots = np.fromiter(map(slot_of.get, users, repeat(-1)), np.int64, len(users))
        found = slots >= 0
        if found.all():  # the usual case: one gather, no NaN-filled matrix to write it into (1 MB at 2,000 rows)
            return self._vectors_of(slots)
        out = np.full((len(users), self._config.dim), np.nan, dtype=np.float32)
        if found.any():
            out[found] = self._vectors_of(slots[found])
        return out

    @property
    def faiss_index(self) -> faiss.IndexHNSW:
        """The underlying FAISS index, for diagnostics and benchmarks: adding to it directly breaks the maps."""
        return self._index

    def stats(self) -> dict[str, Any]:
        """Sizes for monitoring and benchmarks (bytes are the numpy-owned buffers, not FAISS's)."""
        return {
            "live": len(self),
            "slots": self._n_slots,
            "tombstones": self._tombstones,
            "rebuilds": self.rebuilds,
            "exact_fallbacks": self.exact_fallbacks,
            "brute_force_searches": self.brute_force_searches,
            "vector_copy_bytes": int(self._vectors.nbytes),
            "quantization": self._config.quantization,
        }

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held by the index, by part: FAISS's vector codes and HNSW links (C++ buffers, read from their
        sizes, not copied) and the numpy-owned copies and maps kept beside them."""
        hnsw = self._index.hnsw
        codes = faiss.downcast_index(self._index.storage).codes.size()
        # neighbours and levels are int32, offsets size_t (faiss/impl/HNSW.h)
        links = 4 * hnsw.neighbors.size() + 4 * hnsw.levels.size() + 8 * hnsw.offsets.size()
        numpy_owned = (self._vectors.nbytes + self._slot_users.nbytes + self._live.nbytes + self._bitmap.nbytes)
        return {"faiss_codes": int(codes), "faiss_links": int(links), "numpy_copies": int(numpy_owned),
                "slots": self._n_slots}

    # -------------------------------------------------------------------------------------- mutation

    def upsert(self, users: np.ndarray | Iterable[int] | int, vectors: np.ndarray) -> None:
        """Add users or replace their vectors. A user repeated in the batch gets its last vector.

        A user whose vector is unchanged (bit for bit) is left alone, so replaying a stream after a restart
        does not churn tombstones.
        """
        user_array = _as_users(users)
        vector_array = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32).reshape(-1, self._config.dim))
        if len(user_array) != len(vector_array):
            raise ValueError(f"{len(user_array)} users but {len(vector_array)} vectors")
        if len(user_array) == 0:
            return
        _check_unit_vectors(vector_array)
        if len(user_array) > 1:
            user_array, vector_array = _last_occurrences(user_array, vector_array)

        user_list = user_array.tolist()
        old_slots = np.array([self._slot_of.get(user, -1) for user in user_list], dtype=np.int64)
        replaced = old_slots >= 0
        if replaced.any() and self._can_compare_vectors():
            unchanged = np.zeros(len(user_list), dtype=bool)
            unchanged[replaced] = np.all(self._vectors_of(old_slots[replaced]) == vector_array[replaced], axis=1)
            if unchanged.any():
                keep = ~unchanged
                user_array, vector_array, old_slots = user_array[keep], vector_array[keep], old_slots[keep]
                user_list = user_array.tolist()
                replaced = old_slots >= 0
                if len(user_list) == 0:
                    return

        dead = old_slots[replaced]
        self._set_live(dead, False)
        self._tombstones += len(dead)

        first = self._n_slots
        new_slots = np.arange(first, first + len(user_list), dtype=np.int64)
        self._ensure_capacity(first + len(user_list))
        self._index.add(vector_array)
        if self._config.keep_vectors:
            self._vectors[first : first + len(user_list)] = vector_array
        self._slot_users[first : first + len(user_list)] = user_array
        self._n_slots = first + len(user_list)
        self._set_live(new_slots, True)
        for user, slot in zip(user_list, range(first, self._n_slots), strict=True):
            self._slot_of[user] = slot
        if self._changed_during_rebuild is not None:
            self._changed_during_rebuild.update(user_list)
        self._maybe_rebuild()

    def delete(self, users: np.ndarray | Iterable[int] | int) -> int:
        """Remove users (unknown ones are ignored); returns how many were removed."""
        slots = []
        for user in _as_users(users).tolist():
            slot = self._slot_of.pop(user, None)
            if slot is not None:
                slots.append(slot)
                if self._changed_during_rebuild is not None:
                    self._changed_during_rebuild.add(user)
        if slots:
            self._set_live(np.array(slots, dtype=np.int64), False)
            self._tombstones += len(slots)
            self._maybe_rebuild()
        return len(slots)

    def reconfigure(self, config: AnnConfig) -> None:
        """Switch to another config: search-time fields (efSearch, rebuild fraction, re-rank factor) apply at
        once; another graph or storage (dim excepted) rebuilds the index from the current vectors."""
        if config.dim != self._config.dim:
            raise ValueError(f"the index has dim {self._config.dim}, config asks for {config.dim}")
        changed = {name for name, value in asdict(config).items() if asdict(self._config)[name] != value}
        if changed <= SEARCH_TIME_FIELDS:
            self._config = config
            self._index.hnsw.efSearch = config.ef_search
        else:
            self._rebuild_as(config)

    def rebuild(self) -> None:
        """A new HNSW graph over the live vectors only (slots renumbered in their current order)."""
        self._rebuild_as(self._config)

    # A rebuild of a large index takes long (0.37 s for 3,000 users, minutes for millions) and its owner's event
    # loop must not wait for it. In three steps: the live vectors are copied; a thread builds the new graph from
    # the copy (FAISS releases the GIL while it adds); the new graph replaces the old and the users changed in
    # the meantime are applied to it.

    def rebuild_due(self) -> bool:
        """Tombstones reached the rebuild fraction and no rebuild is under way."""
        return (self._changed_during_rebuild is None and self._tombstones > 0
                and self._tombstones >= self._config.rebuild_tombstone_fraction * self._n_slots)

    def begin_rebuild(self) -> PendingRebuild:
        """Copy the live users and vectors; from now on changed users are remembered for finish_rebuild."""
        live_slots = np.flatnonzero(self._live[: self._n_slots])
        vectors = np.ascontiguousarray(self._vectors_of(live_slots), dtype=np.float32)
        self._changed_during_rebuild = set()
        return PendingRebuild(self._config, self._slot_users[live_slots].copy(), vectors)

    @staticmethod
    def build_graph(pending: PendingRebuild) -> faiss.IndexHNSW:
        """The new graph of a pending rebuild; touches only the copy, so it may run on another thread."""
        faiss_index = new_faiss_index(pending.config)
        if len(pending.users):
            faiss_index.add(pending.vectors)
        return faiss_index

    def finish_rebuild(self, pending: PendingRebuild, faiss_index: faiss.IndexHNSW) -> None:
        """Swap the new graph in, then apply to it what changed since begin_rebuild (the current vector of each
        user changed, or its deletion)."""
        changed = self._changed_during_rebuild or set()
        self._changed_during_rebuild = None
        if pending.config != self._config:  # reconfigured meanwhile: that rebuilt the index already
            return
        current = {user: self.get(user) for user in changed}
        self._install(pending.config, faiss_index, pending.users, pending.vectors)
        upserts = [(user, vector) for user, vector in current.items() if vector is not None]
        if upserts:
            self.upsert(np.array([u for u, _ in upserts], dtype=np.int64), np.stack([v for _, v in upserts]))
        gone = [user for user, vector in current.items() if vector is None and user in self._slot_of]
        if gone:
            self.delete(np.array(gone, dtype=np.int64))

    def abandon_rebuild(self) -> None:
        """The build failed: forget the pending rebuild (the current graph stays; a later one may retry)."""
        self._changed_during_rebuild = None

    # ---------------------------------------------------------------------------------------- search

    def search(
        self, vector: np.ndarray, k: int, exclude: Iterable[int] = (), *, ef_search: int | None = None
    ) -> list[tuple[int, float]]:
        """Up to k (user, score) pairs, best first, none of them in ``exclude``.

        The score is the inner product of the query with the user's current vector. Exactly min(k, eligible)
        pairs come back, where eligible counts the live users not excluded.
        """
        _check_k(k)
        query = self._as_query(vector)
        excluded_slots = self._live_slots_of(exclude)
        eligible = len(self._slot_of) - len(excluded_slots)
        wanted = min(k, eligible)
        if wanted <= 0:
            return []
        fetch = min(eligible, self._fetch_size(k))
        beam = max(ef_search or self._config.ef_search, fetch)
        if self._config.brute_force(eligible, beam):
            self.brute_force_searches += 1
            return self._exact(query, k, excluded_slots)

        self._set_bits(excluded_slots, False)
        try:
            slots = self._hnsw_search(query[None, :], fetch, beam)[0]
            if int((slots >= 0).sum()) < wanted:
                # Restrictive filters can starve the beam: widen it once before giving up on HNSW.
                slots = self._hnsw_search(query[None, :], fetch, max(4 * beam, 256))[0]
        finally:
            self._set_bits(excluded_slots, True)
        found = slots[slots >= 0]
        self._check_results(found, excluded_slots)
        if len(found) < wanted:
            self.exact_fallbacks += 1
            return self._exact(query, k, excluded_slots)
        return self._ranked(found, query, k)

    def search_batch(
        self, vectors: np.ndarray, k: int, *, ef_search: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k for many queries at once (no exclusions): users int64 [n, k] padded with -1, and scores
        float32 [n, k] padded with -inf (a score of -1 is a real inner product of unit vectors)."""
        _check_k(k)
        queries = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32).reshape(-1, self._config.dim))
        n = len(queries)
        users = np.full((n, k), -1, dtype=np.int64)
        scores = np.full((n, k), -np.inf, dtype=np.float32)
        wanted = min(k, len(self._slot_of))
        if n == 0 or wanted <= 0:
            return users, scores
        fetch = min(len(self._slot_of), self._fetch_size(k))
        beam = max(ef_search or self._config.ef_search, fetch)
        brute_force = self._config.brute_force(len(self._slot_of), beam)
        slots = np.empty((n, 0), np.int64) if brute_force else self._hnsw_search(queries, fetch, beam)
        self._check_results(slots[slots >= 0], np.empty(0, dtype=np.int64))
        for row in range(n):
            found = slots[row][slots[row] >= 0]
            if brute_force or len(found) < wanted:
                self.brute_force_searches += brute_force
                self.exact_fallbacks += not brute_force
                pairs = self._exact(queries[row], k, np.empty(0, dtype=np.int64))
            else:
                pairs = self._ranked(found, queries[row], k)
            users[row, : len(pairs)] = [user for user, _ in pairs]
            scores[row, : len(pairs)] = [score for _, score in pairs]
        return users, scores

    def exact_search(self, vector: np.ndarray, k: int, exclude: Iterable[int] = ()) -> list[tuple[int, float]]:
        """Brute force over the live vectors: the oracle for tests and recall."""
        _check_k(k)
        return self._exact(self._as_query(vector), k, self._live_slots_of(exclude))

    # ----------------------------------------------------------------------------------- persistence

    def snapshot(self, directory: str | Path, watermark: dict[str, Any], *, retain: int = 1,
                 arrays: dict[str, np.ndarray] | None = None) -> Path:
        """Write the index atomically under ``directory``; returns the snapshot's folder.

        Files go to a temporary folder, are fsynced, and the folder is renamed to ``snapshot-<generation>``
        (the commit point), then the root is fsynced. ``arrays``: the owner's own arrays, committed in the same
        folder (:meth:`load_with_arrays` gives them back). Older generations are removed only after that, keeping
        the newest ``retain``, so a crash at any point leaves the last good snapshot loadable. One writer per
        directory is assumed (leftover temporary folders are taken for crash debris and removed).
        """
        if retain < 1:
            raise ValueError("retain must be ≥ 1")
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        watermark_json = json.loads(json.dumps(watermark))  # fails before any write if not JSON-serialisable
        for stale in root.glob(TEMP_PREFIX + "*"):
            shutil.rmtree(stale, ignore_errors=True)
        generation = max((g for g, _ in _generations(root)), default=0) + 1
        temp = root / f"{TEMP_PREFIX}{generation:012d}-{uuid.uuid4().hex}"
        final = root / f"{SNAPSHOT_PREFIX}{generation:012d}"
        temp.mkdir()
        try:
            live_slots = np.flatnonzero(self._live[: self._n_slots])
            faiss.write_index(self._index, str(temp / INDEX_FILE))
            state: dict[str, np.ndarray] = {
                "slot_users": self._slot_users[: self._n_slots],
                "live_slots": live_slots,
            }
            if self._config.keep_vectors:
                state["live_vectors"] = self._vectors[live_slots]
            with open(temp / STATE_FILE, "wb") as handle:
                np.savez(handle, **state)  # type: ignore[arg-type]
            files = [INDEX_FILE, STATE_FILE]
            if arrays is not None:
                with open(temp / ARRAYS_FILE, "wb") as handle:
                    np.savez(handle, **arrays)  # type: ignore[arg-type]
                files.append(ARRAYS_FILE)
            manifest = {
                "format": SNAPSHOT_FORMAT,
                "generation": generation,
                "config": asdict(self._config),
                "watermark": watermark_json,
                "live": len(self._slot_of),
                "slots": self._n_slots,
                "tombstones": self._tombstones,
                "rebuilds": self.rebuilds,
                "files": {name: _fsync_and_hash(temp / name) for name in files},
            }
            _write_manifest(temp / MANIFEST_FILE, manifest)
            _fsync_directory(temp)
            os.rename(temp, final)
            _fsync_directory(root)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
        for old_generation, path in _generations(root)[:-retain]:
            if old_generation < generation:
                shutil.rmtree(path, ignore_errors=True)
        return final

    @classmethod
    def load(cls, directory: str | Path, config: AnnConfig | None = None) -> tuple[AnnIndex, dict[str, Any]]:
        """:meth:`load_with_arrays` without the arrays."""
        index, watermark, _ = cls.load_with_arrays(directory, config)
        return index, watermark

    @classmethod
    def load_with_arrays(cls, directory: str | Path, config: AnnConfig | None = None
                         ) -> tuple[AnnIndex, dict[str, Any], dict[str, np.ndarray]]:
        """The newest complete snapshot under ``directory`` and its watermark; an empty index and ``{}`` when
        there is none. A snapshot that fails verification (torn or corrupt) is skipped for the one before.

        With ``config`` the loaded index is :meth:`reconfigure`-d to it (a different graph or storage rebuilds
        it from the snapshot's vectors).
        """
        root = Path(directory)
        generations = _generations(root) if root.is_dir() else []
        for generation, path in reversed(generations):
            try:
                index, watermark = cls._read_snapshot(path)
                arrays: dict[str, np.ndarray] = {}
                if (path / ARRAYS_FILE).exists():
                    with np.load(path / ARRAYS_FILE) as stored:
                        arrays = {name: np.asarray(stored[name]) for name in stored.files}
            except Exception as error:  # any damage means: not a usable snapshot, try the previous one
                log.warning("skipping snapshot generation %d at %s: %s", generation, path, error)
                continue
            if config is not None and config != index.config:
                index.reconfigure(config)
            return index, watermark, arrays
        return cls(config), {}, {}

    # -------------------------------------------------------------------------------------- internals

    @classmethod
    def _read_snapshot(cls, path: Path) -> tuple[AnnIndex, dict[str, Any]]:
        manifest = json.loads((path / MANIFEST_FILE).read_text(encoding="utf-8"))
        if manifest.get("format") != SNAPSHOT_FORMAT:
            raise ValueError(f"unknown snapshot format {manifest.get('format')!r}")
        for name, digest in manifest["files"].items():
            if _hash_file(path / name) != digest:
                raise ValueError(f"{name} does not match its checksum")
        config = AnnConfig(**manifest["config"])
        faiss_index = faiss.read_index(str(path / INDEX_FILE))
        with np.load(path / STATE_FILE) as state:
            slot_users = np.asarray(state["slot_users"], dtype=np.int64)
            live_slots = np.asarray(state["live_slots"], dtype=np.int64)
            live_vectors = np.asarray(state["live_vectors"], dtype=np.float32) if config.keep_vectors else None
        n_slots = len(slot_users)
        if faiss_index.ntotal != n_slots or faiss_index.d != config.dim:
            raise ValueError(f"index holds {faiss_index.ntotal}×{faiss_index.d}, state {n_slots}×{config.dim}")
        faiss_index.hnsw.efSearch = config.ef_search

        index = cls(config)
        index._index = faiss_index
        index._ensure_capacity(n_slots)
        index._n_slots = n_slots
        index._slot_users[:n_slots] = slot_users
        index._set_live(live_slots, True)
        if live_vectors is not None:
            index._vectors[live_slots] = live_vectors
        index._slot_of = dict(zip(slot_users[live_slots].tolist(), live_slots.tolist(), strict=True))
        if len(index._slot_of) != len(live_slots):
            raise ValueError("a user has two live slots")
        index._tombstones = n_slots - len(live_slots)
        index.rebuilds = int(manifest.get("rebuilds", 0))
        return index, dict(manifest["watermark"])

    def _rebuild_as(self, config: AnnConfig) -> None:
        live_slots = np.flatnonzero(self._live[: self._n_slots])
        vectors = np.ascontiguousarray(self._vectors_of(live_slots), dtype=np.float32)
        users = self._slot_users[live_slots].copy()
        pending = PendingRebuild(config, users, vectors)
        self._install(config, self.build_graph(pending), users, vectors)

    def _install(self, config: AnnConfig, faiss_index: faiss.IndexHNSW, users: np.ndarray,
                 vectors: np.ndarray) -> None:
        """Make a graph built over these users' vectors (slot i is users[i]) the index."""
        self._config = config
        self._index = faiss_index
        self._capacity = 0
        self._slot_users = np.empty(0, dtype=np.int64)
        self._live = np.empty(0, dtype=bool)
        self._bitmap = np.empty(0, dtype=np.uint8)
        self._vectors = np.empty((0, config.dim), dtype=np.float32)
        self._ensure_capacity(len(users))
        self._n_slots = len(users)
        self._slot_users[: len(users)] = users
        if config.keep_vectors:
            self._vectors[: len(users)] = vectors
        new_slots = np.arange(len(users), dtype=np.int64)
        self._set_live(new_slots, True)
        self._slot_of = dict(zip(users.tolist(), new_slots.tolist(), strict=True))
        self._tombstones = 0
        self.rebuilds += 1

    def _maybe_rebuild(self) -> None:
        if self.rebuild_in_background:
            return
        if self._tombstones and self._tombstones >= self._config.rebuild_tombstone_fraction * self._n_slots:
            self.rebuild()

    def _ensure_capacity(self, needed: int) -> None:
        """Grow the per-slot arrays geometrically, so n single adds copy O(n) elements in total."""
        if needed <= self._capacity:
            return
        capacity = max(needed, 2 * self._capacity, 1024)
        capacity = (capacity + 7) // 8 * 8  # whole bitmap bytes
        self._slot_users = _grown(self._slot_users, capacity, fill=-1)
        self._live = _grown(self._live, capacity, fill=False)
        self._bitmap = _grown(self._bitmap, capacity // 8, fill=0)
        if self._config.keep_vectors:
            self._vectors = _grown(self._vectors, capacity, fill=0.0)
        self._capacity = capacity

    def _set_live(self, slots: np.ndarray, live: bool) -> None:
        self._live[slots] = live
        self._set_bits(slots, live)

    def _set_bits(self, slots: np.ndarray, on: bool) -> None:
        if len(slots) == 0:
            return
        if len(slots) <= 8:  # the one-user upsert of a stream: plain indexing beats ufunc.at's set-up
            bitmap = self._bitmap
            for slot in slots.tolist():
                if on:
                    bitmap[slot >> 3] |= 1 << (slot & 7)
                else:
                    bitmap[slot >> 3] &= ~(1 << (slot & 7)) & 0xFF
            return
        masks = np.left_shift(np.uint8(1), (slots & 7).astype(np.uint8))
        if on:
            np.bitwise_or.at(self._bitmap, slots >> 3, masks)
        else:
            np.bitwise_and.at(self._bitmap, slots >> 3, ~masks)

    def _live_slots_of(self, users: Iterable[int]) -> np.ndarray:
        if isinstance(users, np.ndarray):
            users = users.reshape(-1).tolist()
        slots = {self._slot_of[user] for user in users if user in self._slot_of}
        return np.fromiter(slots, dtype=np.int64, count=len(slots))

    def _fetch_size(self, k: int) -> int:
        if self._config.quantization == "sq8" and self._config.keep_vectors:
            return math.ceil(k * self._config.sq8_rerank_factor)
        return k

    def _hnsw_search(self, queries: np.ndarray, fetch: int, beam: int) -> np.ndarray:
        """Slots of the HNSW top-`fetch` among the slots whose bit is set (-1 where the beam found fewer)."""
        selector = faiss.IDSelectorBitmap(self._n_slots, faiss.swig_ptr(self._bitmap))
        params = faiss.SearchParametersHNSW(sel=selector, efSearch=beam)
        _, labels = self._index.search(queries, fetch, params=params)
        return labels

    def _check_results(self, found: np.ndarray, excluded_slots: np.ndarray) -> None:
        """The selector must have kept tombstones and exclusions out: an invariant, checked because it is cheap."""
        if not self._live[found].all() or (len(excluded_slots) and np.isin(found, excluded_slots).any()):
            raise RuntimeError("HNSW returned a tombstoned or excluded slot despite the selector")

    def _ranked(self, slots: np.ndarray, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        return self._top(slots, _inner_products(self._vectors_of(slots), query), k)

    def _exact(self, query: np.ndarray, k: int, excluded_slots: np.ndarray) -> list[tuple[int, float]]:
        if k <= 0 or not self._slot_of:
            return []
        eligible = self._live[: self._n_slots].copy()
        eligible[excluded_slots] = False
        slots = np.flatnonzero(eligible)
        if self._config.keep_vectors:  # one pass over the matrix, no gather copy
            scores = _inner_products(self._vectors[: self._n_slots], query)[slots]
        else:
            scores = _inner_products(self._vectors_of(slots), query)
        if len(slots) > k:
            # every user tied with the k-th score stays in, so _top breaks the tie by id (an argpartition's
            # first k would keep an arbitrary one of them: the oracle must not depend on slot order)
            kth = np.partition(scores, len(scores) - k)[len(scores) - k]
            best = scores >= kth
            slots, scores = slots[best], scores[best]
        return self._top(slots, scores, k)

    def _top(self, slots: np.ndarray, scores: np.ndarray, k: int) -> list[tuple[int, float]]:
        """Best first; ties by user id, so HNSW and the oracle agree on order."""
        users = self._slot_users[slots]
        order = np.lexsort((users, -scores))[:k]
        return list(zip(users[order].tolist(), scores[order].astype(np.float64).tolist(), strict=True))

    def _vectors_of(self, slots: np.ndarray) -> np.ndarray:
        if self._config.keep_vectors:
            return self._vectors[slots]
        if len(slots) == 0:
            return np.empty((0, self._config.dim), dtype=np.float32)
        return self._index.reconstruct_batch(np.ascontiguousarray(slots, dtype=np.int64))

    def _can_compare_vectors(self) -> bool:
        """Whether stored vectors are the exact ones given, so an unchanged upsert can be recognised."""
        return self._config.keep_vectors or self._config.quantization == "flat"

    def _as_query(self, vector: np.ndarray) -> np.ndarray:
        query = np.ascontiguousarray(np.asarray(vector, dtype=np.float32).reshape(-1))
        if query.shape != (self._config.dim,):
            raise ValueError(f"query must have {self._config.dim} components, got {query.shape}")
        return query


def _as_users(users: np.ndarray | Iterable[int] | int) -> np.ndarray:
    raw = np.asarray(users if isinstance(users, np.ndarray | int | np.integer) else list(users))
    if raw.size and raw.dtype.kind not in "iu":
        raise TypeError(f"user ids must be integers, got {raw.dtype}")
    if raw.dtype.kind == "u" and raw.size and raw.max() > np.iinfo(np.int64).max:
        raise ValueError("user ids must fit in int64")
    array = raw.astype(np.int64).reshape(-1)
    if (array < 0).any():
        raise ValueError("user ids must be non-negative")
    return array


def _check_k(k: int) -> None:
    if k < 0:
        raise ValueError(f"k must be ≥ 0, got {k}")


def _check_unit_vectors(vectors: np.ndarray) -> None:
    squared_norms = np.einsum("ij,ij->i", vectors, vectors)
    # One comparison also rejects NaN and ±inf (NaN compares false; inf is far from 1). |n² - 1| ≈ 2·|n - 1|.
    if not (np.abs(squared_norms - 1.0) <= 2 * UNIT_NORM_TOLERANCE).all():
        if not np.isfinite(vectors).all():
            raise ValueError("vectors must be finite")
        norms = np.sqrt(squared_norms)
        raise ValueError(f"vectors must be L2-normalised (norms {norms.min():.4f}..{norms.max():.4f})")


def _last_occurrences(users: np.ndarray, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each user once, with the vector of its last occurrence, in the order of those last occurrences."""
    _, first_in_reversed = np.unique(users[::-1], return_index=True)
    if len(first_in_reversed) == len(users):
        return users, vectors
    keep = np.sort(len(users) - 1 - first_in_reversed)
    return users[keep], np.ascontiguousarray(vectors[keep])


def _grown(array: np.ndarray, capacity: int, fill: Any) -> np.ndarray:
    grown = np.full((capacity, *array.shape[1:]), fill, dtype=array.dtype)
    grown[: len(array)] = array
    return grown


def _generations(root: Path) -> list[tuple[int, Path]]:
    """Committed snapshot folders, oldest first."""
    found = []
    for path in root.glob(SNAPSHOT_PREFIX + "*"):
        suffix = path.name[len(SNAPSHOT_PREFIX) :]
        if path.is_dir() and suffix.isdigit():
            found.append((int(suffix), path))
    return sorted(found)


def _write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_and_hash(path: Path) -> str:
    """Flush a finished file to disk and return its checksum (read back from the page cache, so cheap)."""
    digest = _hash_file(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return digest


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _inner_products(vectors: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Each row's inner product with the query. einsum, not ``@``: BLAS's matrix-vector product rounds a row's sum
    differently by where the row sits in the matrix (its kernels work in blocks of rows), so the same two vectors
    got scores a few ulps apart from a search that gathered them in another order, or from an index whose slots
    were numbered otherwise (a worker that took over a partition, a rebuild). einsum sums each row alike."""
    return np.einsum("ij,j->i", vectors, query)


def shard_k(k: int, shards: int, sigmas: float) -> int:
    """How many of a query's top k to ask each of ``shards`` shards for: the mean share k/S plus ``sigmas``
    standard deviations of a binomial share (users are hashed to partitions, so the global top k falls on a shard
    like Binomial(k, 1/S)), at most k. ``sigmas`` ≤ 0: k (every shard its full top k). Not an approximation by
    itself: :func:`truncated_shards` finds the shards whose cut may have dropped a global top-k user, which are
    asked again for k."""
    if sigmas <= 0 or shards <= 1:
        return k
    share = k / shards
    return min(k, math.ceil(share + sigmas * math.sqrt(share * (1 - 1 / shards))))


def truncated_shards(answer_counts: Sequence[int], last_scores: Sequence[float], asked: int,
                     merged_scores: np.ndarray, k: int) -> list[int]:
    """The shards whose answer (``asked`` hits, cut there) may hide a user of the merged top k: a shard that
    returned all ``asked`` hits and whose last hit scores at least the merged k-th score (or the merge has fewer
    than k). A shard that returned fewer than asked had no more eligible users; one whose last hit is below the
    merged k-th score has nothing further above it. With exact shard searches, the merge is exact once these are
    asked again for k."""
    kth = merged_scores[k - 1] if len(merged_scores) >= k else -np.inf
    return [shard for shard, (count, last) in enumerate(zip(answer_counts, last_scores, strict=True))
            if count >= asked and asked < k and last >= kth]


def merge_top_k_arrays(ids: Sequence[np.ndarray], scores: Sequence[np.ndarray], k: int
                       ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`merge_top_k` of shards' answers given as arrays (ids int64 padded with -1, scores float64): one
    sort of their concatenation, best first, ties by id, each user once at its best score."""
    _check_k(k)
    all_ids = np.concatenate([np.asarray(i, np.int64).reshape(-1) for i in ids]) if ids else np.empty(0, np.int64)
    all_scores = (np.concatenate([np.asarray(x, np.float64).reshape(-1) for x in scores]) if scores
                  else np.empty(0, np.float64))
    real = all_ids >= 0
    all_ids, all_scores = all_ids[real], all_scores[real]
    order = np.lexsort((all_ids, -all_scores))
    all_ids, all_scores = all_ids[order], all_scores[order]
    _, first = np.unique(all_ids, return_index=True)  # a user's first place in the order is its best score
    keep = np.sort(first)[:k]
    return all_ids[keep], all_scores[keep]


def merge_top_k(shard_hits: Iterable[Sequence[tuple[int, float]]], k: int) -> list[tuple[int, float]]:
    """The top k of several shards' answers to one query, best first, ties by user id (the order of
    :meth:`AnnIndex.search`). A user answered by two shards (a partition held by both during a rebalance) counts
    once, with its best score. When every shard's answer is its exact top k over disjoint users, the merge is
    the exact top k over their union: any user of the global top k is in its own shard's top k, since fewer
    than k users of that shard rank above it."""
    _check_k(k)
    best: dict[int, float] = {}
    for hits in shard_hits:
        for user, score in hits:
            held = best.get(user)
            if held is None or score > held:
                best[user] = score
    return sorted(best.items(), key=lambda item: (-item[1], item[0]))[:k]
