"""Where a process's memory is, as the C allocator sees it: what Python, RocksDB, FAISS and torch allocate
through malloc in use, and what malloc holds free (fragmentation it has not returned to the system).

Read from glibc's ``mallinfo2`` (glibc ≥ 2.33); None elsewhere. RocksDB and FAISS allocate with malloc too,
so these figures span every library: with the per-part figures beside them they tell growth of live data
from memory malloc keeps after frees."""

from __future__ import annotations

import ctypes
import os
from functools import cache


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


@cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    if not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = _MallInfo2
    return libc


def malloc_bytes() -> dict[str, int] | None:
    """``in_use``: bytes handed out by malloc (heap arenas and mmapped blocks); ``free_in_arenas``: bytes malloc
    keeps in its arenas unused; ``mmapped``: the large blocks it mmapped (part of in_use)."""
    libc = _libc()
    if libc is None:
        return None
    info = libc.mallinfo2()
    return {"in_use": int(info.uordblks + info.hblkhd), "free_in_arenas": int(info.fordblks),
            "mmapped": int(info.hblkhd)}


def rss_bytes() -> int:
    """Resident memory of this process (Linux /proc)."""
    with open("/proc/self/statm") as statm:  # resident pages, second field
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
