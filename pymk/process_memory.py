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


def pymalloc_bytes() -> dict[str, int] | None:
    """Python's small-object allocator (objects up to 512 bytes, in 1 MB arenas it mmaps itself, outside
    malloc): ``arenas`` mapped, ``allocated_blocks`` live objects, ``available_blocks`` free space inside used
    pools. An arena goes back to the system only when all its objects are freed, so a cache that shrinks can
    leave its arenas mapped: ``arenas`` minus ``allocated_blocks`` is that slack.

    CPython prints these only to the C stderr (``sys._debugmallocstats``): fd 2 is pointed at a temporary file
    for the call, so a line another thread writes to stderr in that instant would land there. Call it on
    request only (``/memory?pymalloc=1``), never on a hot path."""
    import sys
    import tempfile

    if not hasattr(sys, "_debugmallocstats"):
        return None
    with tempfile.TemporaryFile() as capture:
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            os.dup2(capture.fileno(), 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        capture.seek(0)
        text = capture.read().decode(errors="replace")
    fields = {"# arenas allocated current": "arenas", "# bytes in allocated blocks": "allocated_blocks",
              "# bytes in available blocks": "available_blocks"}
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, _, value = line.partition("=")
        key = fields.get(name.strip())
        if key is not None:
            out[key] = int(value.strip().replace(",", ""))
    if "arenas" in out:
        out["arenas"] *= 1 << 20  # bytes: CPython ≥ 3.10 arenas are 1 MiB on 64-bit
    return out if len(out) == len(fields) else None
