"""The small storage interface the feature code runs on, and its RocksDB implementation (rocksdict).

Feature state is a set of *rows*: one value per (row kind, user id). Pure code reads rows through
:class:`RowStore` and writes them back in one atomic batch per commit, so a crash leaves the database at
the previous commit, never half-way through one.
"""

from __future__ import annotations

import itertools
import math
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

_ID = struct.Struct(">Q")  # big-endian: keys of one kind sort by user id


def row_key(kind: bytes, user: int) -> bytes:
    return kind + _ID.pack(user)


def row_user(key: bytes) -> int:
    return int(_ID.unpack_from(key, 1)[0])


class RowStore(Protocol):
    """What the feature code needs from a key-value store."""

    def get(self, key: bytes) -> bytes | None: ...

    def write(self, puts: Mapping[bytes, bytes], deletes: Iterable[bytes] = ()) -> None:
        """Apply all puts and deletes atomically."""
        ...

    def scan(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]: ...

    def close(self) -> None: ...


class RocksMemory:
    """One RocksDB memory budget for every database of the process: a shared LRU block cache, with the
    memtables charged to it by a shared write-buffer manager. Without it each partition's database has its own
    block cache and up to two 64 MB memtables, so RocksDB's memory grows with the partitions a worker owns."""

    def __init__(self, total_bytes: int) -> None:
        from rocksdict import BlockBasedOptions, Cache, WriteBufferManager

        self.total_bytes = total_bytes
        self.cache = Cache(total_bytes)
        # memtables may take half of the budget (charged to the cache, so blocks and memtables share one bound);
        # past it RocksDB flushes memtables early rather than growing
        self.write_buffers = WriteBufferManager.new_write_buffer_manager_with_cache(total_bytes // 2, False,
                                                                                    self.cache)
        self.table = BlockBasedOptions()
        self.table.set_block_cache(self.cache)
        self.table.set_cache_index_and_filter_blocks(True)  # else index and filter blocks sit outside the bound

    def configure(self, options: Any) -> None:
        options.set_block_based_table_factory(self.table)
        options.set_write_buffer_manager(self.write_buffers)
        options.set_write_buffer_size(max(1 << 20, min(64 << 20, self.total_bytes // 8)))

    def usage_bytes(self) -> int:
        return int(self.cache.get_usage())


class RocksRowStore:
    """A RocksDB database (through rocksdict, raw bytes mode) as a :class:`RowStore`."""

    def __init__(self, path: str | Path, sync: bool = False, memory: RocksMemory | None = None) -> None:
        from rocksdict import Options, Rdict, WriteOptions

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        options = Options(raw_mode=True)
        options.create_if_missing(True)
        options.set_max_background_jobs(2)
        options.increase_parallelism(2)
        if memory is not None:
            memory.configure(options)
        self._db = Rdict(str(self.path), options)
        write_options = WriteOptions()
        # The WAL is on; fsync per batch is a setting (a machine crash, not a process crash, needs it).
        write_options.sync = sync
        self._db.set_write_options(write_options)

    def get(self, key: bytes) -> bytes | None:
        return self._db.get(key)

    def write(self, puts: Mapping[bytes, bytes], deletes: Iterable[bytes] = ()) -> None:
        from rocksdict import WriteBatch

        batch = WriteBatch(raw_mode=True)
        for key, value in puts.items():
            batch.put(key, value)
        for key in deletes:
            batch.delete(key)
        if not batch.is_empty():
            self._db.write(batch)

    def scan(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        it = self._db.iter()
        it.seek(prefix)
        while it.valid():
            key = it.key()
            if not key.startswith(prefix):
                break
            yield key, it.value()
            it.next()

    # RocksDB memory outside the block cache, per database (memtables are charged to the cache as well when a
    # RocksMemory is shared; table readers are not when index and filter blocks are cached, so near 0 then)
    MEMORY_PROPERTIES = {"table_readers": "rocksdb.estimate-table-readers-mem",
                         "memtables": "rocksdb.cur-size-all-mem-tables",
                         "block_cache_pinned": "rocksdb.block-cache-pinned-usage"}

    def memory_properties(self) -> dict[str, int]:
        """This database's memory figures in bytes (RocksDB's own estimates), by MEMORY_PROPERTIES name."""
        return {name: int(self._db.property_int_value(prop) or 0) for name, prop in self.MEMORY_PROPERTIES.items()}

    def close(self) -> None:
        self._db.close()


class DictRowStore:
    """A plain dict with the same interface, for pure-function tests that need thousands of fresh stores."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}

    def get(self, key: bytes) -> bytes | None:
        return self.data.get(key)

    def write(self, puts: Mapping[bytes, bytes], deletes: Iterable[bytes] = ()) -> None:
        self.data.update(puts)
        for key in deletes:
            self.data.pop(key, None)

    def scan(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        for key in sorted(k for k in self.data if k.startswith(prefix)):
            yield key, self.data[key]

    def close(self) -> None:
        pass


# What cached rows cost in memory, measured with tracemalloc on CPython 3.11 (dicts and sets of 64-bit ids and
# versions or timestamps): about 400 bytes per row (its objects and its slot in the cache) plus 110 bytes per
# entry in it (neighbour → version, candidate → count, item → timestamp, one timestamp of a set).
ROW_BYTES = 400
ENTRY_BYTES = 110


def row_cache_bytes(rows: int, entries: int) -> int:
    return ROW_BYTES * rows + ENTRY_BYTES * entries


@runtime_checkable
class RowHolder(Protocol):
    """A write-back holder of one kind of rows of a partition (graph, behaviour, profiles, pending work,
    embeddings, published lists): what changed since the last flush goes into the partition's one WriteBatch."""

    def dirty_rows(self) -> tuple[dict[bytes, bytes], list[bytes]]:
        """(puts, deletes) that persist every change since the last :meth:`mark_clean`."""
        ...

    def mark_clean(self) -> None:
        """The rows given by :meth:`dirty_rows` are written: nothing is dirty any more."""
        ...


@runtime_checkable
class CachedRowHolder(RowHolder, Protocol):
    """A row holder whose clean rows are a cache the partition's :class:`CacheBudget` may shrink, by one rule
    (:func:`evict_oldest_rows`)."""

    def cached_rows(self) -> int: ...

    def cached_bytes(self) -> int: ...

    def evict_oldest(self, fraction: float) -> None: ...


def evict_oldest_rows(cache: dict[Any, Any], fraction: float) -> None:
    """Forget the oldest-loaded ``fraction`` of a row cache: dicts keep insertion order and a row read back from
    the store is inserted again, so this is first-in-first-out; a hot row evicted costs one read and is young
    again. Only for clean rows (after a flush)."""
    for key in list(itertools.islice(cache, math.ceil(len(cache) * fraction))):
        del cache[key]


@dataclass
class CacheBudget:
    """Keeps the write-back row caches of one partition under ``max_bytes`` (approximately: see
    :func:`row_cache_bytes`). Measuring walks every cached row, so it runs at most once per ``min_interval_s`` and
    takes at most ~2% of the time (the next measurement waits 50× as long as this one took; 10× longer still while
    the cache is under a quarter of its budget). Between two
    measurements a cheap count of the cached rows (a few ``len()``) times the bytes per row of the last measurement
    estimates the size at every check, and an estimate over the budget evicts at once, by the estimate: without
    that, a partition loading many rows per second of a dense graph overshot the budget about 2× before its next
    timed measurement (and measuring instead of estimating would walk every row at every flush of a partition
    whose working set is larger than its budget).
    Over the budget, the oldest rows are evicted down to ``keep`` of it — not everything: a worker whose working
    set is larger than the budget then still hits its cache for most of what it reads. Evicted rows are durable:
    later reads come from the store."""

    FAR_UNDER_WAIT_FACTOR: ClassVar[float] = 10.0  # under a quarter of the budget: measured 10× less often

    max_bytes: int
    min_interval_s: float = 1.0
    keep: float = 0.7
    next_check: float = 0.0
    last_bytes: int = 0  # the last measurement, before any eviction it caused
    estimated_bytes: int = 0  # the current size as of the last check: after eviction, or rows × bytes per row
    bytes_per_row: float = 0.0
    evictions: int = 0
    evictions_by_estimate: int = 0  # of which between two measurements, from the row count

    def check(self, measure: Callable[[], int], evict: Callable[[float], None],
              count_rows: Callable[[], int] | None = None) -> None:
        """``evict(fraction)`` forgets that fraction of every cache, oldest rows first; ``count_rows`` (cheap)
        lets a fast-growing cache be evicted before its interval is over."""
        now = time.monotonic()
        rows = count_rows() if count_rows is not None else None
        if now < self.next_check:
            if rows is None or self.bytes_per_row <= 0.0:
                return
            self.estimated_bytes = int(rows * self.bytes_per_row)
            if self.estimated_bytes > self.max_bytes:
                self._evict(self.estimated_bytes, evict)
                self.evictions_by_estimate += 1
            return
        self.last_bytes = measure()
        took = time.monotonic() - now
        if rows:
            self.bytes_per_row = self.last_bytes / rows
        self.estimated_bytes = self.last_bytes
        if self.last_bytes > self.max_bytes:
            self._evict(self.last_bytes, evict)
        wait = max(self.min_interval_s, 50 * took)
        if self.last_bytes * 4 < self.max_bytes:
            # far under the budget (or none set: measured for /stats only) the row-count estimate between two
            # measurements is enough: a worker's partitions each measured every second took ~3.5 % of its time
            wait *= self.FAR_UNDER_WAIT_FACTOR
        self.next_check = now + wait

    def _evict(self, size: int, evict: Callable[[float], None]) -> None:
        fraction = 1.0 - self.keep * self.max_bytes / size
        evict(fraction)
        self.evictions += 1
        self.estimated_bytes = int(size * (1.0 - fraction))
