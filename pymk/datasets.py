"""Reading edge-list files (the graphs of ``data/``, or any file in these formats) as a PYMK event history.

Formats (whitespace-separated, one edge or interaction per line):
- ``u v``                  undirected, no time (SNAP ego-Facebook, CA-HepPh)
- ``src dst unix_ts``      timestamped interactions (SNAP CollegeMsg)
- ``src dst weight unix_ts`` KONECT, with ``%`` header lines (Digg replies)
Lines starting with ``#`` or ``%`` are comments. A file whose name ends in ``.gz`` is read through gzip.

Following the contract's evaluation protocol, a *connection* is the first interaction of an unordered pair;
self-loops are dropped; later interactions of the same pair are behavioural signal (profile views).
Connections are ordered by time, ties by the pair's smaller id then larger id. Files without time keep
their line order (the order of first appearance of each pair).
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

# A file without timestamps is replayed as one connection per second from this instant (2020-01-01 UTC),
# so that ts stays a valid, ordered, past epoch-ms value.
UNTIMED_START_MS = 1_577_836_800_000
UNTIMED_STEP_MS = 1_000

# The formats above in one line, for argparse help (which formats it with %, hence the %%).
FORMATS_HELP = ("an edge-list file, whitespace-separated: `u v` (untimed), `src dst unix_ts` or KONECT "
                "`src dst weight unix_ts`; lines starting with # or %% are comments; .gz files are read as gzip")


@dataclass(frozen=True)
class Interaction:
    u: int
    v: int
    ts_ms: int | None  # None for files without time
    line_no: int


@dataclass(frozen=True)
class EdgeHistory:
    """A graph file read as events: connections in order, and repeated interactions after them."""

    path: str
    timed: bool
    connections: list[tuple[int, int, int]]  # (u, v, ts_ms), protocol order, u != v, each pair once
    repeats: list[tuple[int, int, int]]  # (src, dst, ts_ms): later interactions of already-connected pairs
    self_loops: int
    lines: int

    @property
    def users(self) -> set[int]:
        return {x for u, v, _ in self.connections for x in (u, v)}


def _open_text(path: str | Path) -> TextIO:
    # Most bundled graphs are stored gzipped (a quarter of the size in every clone).
    if str(path).endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def read_interactions(path: str | Path) -> tuple[list[Interaction], bool]:
    """Every data line of the file, and whether the file carries timestamps."""
    interactions: list[Interaction] = []
    timed: bool | None = None
    with _open_text(path) as handle:
        for line_no, line in enumerate(handle, start=1):
            stripped = line.strip()
            if not stripped or stripped[0] in "#%":
                continue
            parts = stripped.split()
            if len(parts) < 2:
                raise ValueError(f"{path}:{line_no}: expected at least two columns, got {stripped!r}")
            u, v = int(parts[0]), int(parts[1])
            if len(parts) == 2:
                ts_ms = None
            elif len(parts) == 3:
                ts_ms = int(float(parts[2])) * 1000
            else:  # KONECT: src dst weight ts
                ts_ms = int(float(parts[3])) * 1000
            line_timed = ts_ms is not None
            if timed is None:
                timed = line_timed
            elif timed != line_timed:
                raise ValueError(f"{path}:{line_no}: mixes lines with and without timestamps")
            interactions.append(Interaction(u, v, ts_ms, line_no))
    return interactions, bool(timed)


def load_edge_history(path: str | Path) -> EdgeHistory:
    interactions, timed = read_interactions(path)
    self_loops = sum(1 for it in interactions if it.u == it.v)
    kept = [it for it in interactions if it.u != it.v]
    if timed:
        # Stable sort: same-time interactions keep file order, so "first" is well defined.
        kept.sort(key=lambda it: it.ts_ms)  # type: ignore[arg-type, return-value]
    first_seen: dict[tuple[int, int], int] = {}
    repeats: list[tuple[int, int, int]] = []
    order: list[tuple[int, int]] = []
    for index, it in enumerate(kept):
        pair = (it.u, it.v) if it.u < it.v else (it.v, it.u)
        ts = it.ts_ms if it.ts_ms is not None else UNTIMED_START_MS + index * UNTIMED_STEP_MS
        if pair in first_seen:
            repeats.append((it.u, it.v, ts))
            continue
        first_seen[pair] = ts
        order.append(pair)
    if timed:
        order.sort(key=lambda pair: (first_seen[pair], pair[0], pair[1]))
    else:
        # Untimed: one connection per step in first-appearance order, so ts is strictly increasing.
        for step, pair in enumerate(order):
            first_seen[pair] = UNTIMED_START_MS + step * UNTIMED_STEP_MS
        repeats = []  # a repeated line of an untimed file is a duplicate, not an interaction
    connections = [(u, v, first_seen[(u, v)]) for u, v in order]
    return EdgeHistory(str(path), timed, connections, repeats, self_loops, len(interactions))
