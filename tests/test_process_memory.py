"""Tier 1: the memory figures the worker's /memory page and the soak report: malloc's view and RocksDB's own."""

from __future__ import annotations

from pathlib import Path

import pytest

from pymk.features.storage import RocksMemory, RocksRowStore
from pymk.process_memory import malloc_bytes, pymalloc_bytes, rss_bytes


def test_malloc_in_use_follows_a_large_allocation_and_its_free() -> None:
    before = malloc_bytes()
    assert before is not None  # glibc on every machine we run on
    block = bytearray(64 * 2**20)  # above the mmap threshold: an mmapped block in use
    during = malloc_bytes()
    assert during is not None and during["in_use"] - before["in_use"] >= 60 * 2**20
    assert rss_bytes() > 0
    del block
    after = malloc_bytes()
    assert after is not None and during["in_use"] - after["in_use"] >= 60 * 2**20


def test_rocksdb_memory_properties_see_the_memtable(tmp_path: Path) -> None:
    store = RocksRowStore(tmp_path / "db", memory=RocksMemory(64 * 2**20))
    try:
        empty = store.memory_properties()
        assert set(empty) == set(RocksRowStore.MEMORY_PROPERTIES)
        store.write({b"k%06d" % i: b"x" * 200 for i in range(5000)})
        assert store.memory_properties()["memtables"] >= empty["memtables"] + 5000 * 200
    finally:
        store.close()


def test_pymalloc_counts_small_objects_and_gives_stderr_back(capfd: pytest.CaptureFixture[str]) -> None:
    import os

    before = pymalloc_bytes()
    assert before is not None and before["arenas"] >= before["allocated_blocks"] > 0
    small = [str(i) * 3 for i in range(200_000)]  # ~50 bytes each: pymalloc's, not malloc's
    during = pymalloc_bytes()
    assert during is not None and during["allocated_blocks"] - before["allocated_blocks"] > 5 * 2**20
    del small
    os.write(2, b"stderr is ours again\n")
    assert capfd.readouterr().err == "stderr is ours again\n"  # and the statistics did not leak into it
