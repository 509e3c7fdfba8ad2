"""Every kind of row in a partition's RocksDB database, in one table: a one-byte key prefix each.

A row key is its prefix and, for per-user rows, the user (or item) id as 8 bytes (``storage.row_key``); the
offsets are the prefix and a topic name. Prefixes must differ — a scan of one kind (``store.scan(prefix)``)
would otherwise read another's rows — and a new kind of row is added here, where a clash is seen
(``tests/test_keyspace.py`` checks the table and that no module defines a prefix of its own).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RowKind:
    name: str
    prefix: bytes
    owner: str  # the module that reads and writes these rows
    holds: str


# graph (features/graph.py)
ADJACENCY = b"A"
MIRROR = b"M"
REVERSE = b"R"
COMMON = b"C"
GRAPH_MODE = b"N"
# behaviour (features/behaviour.py)
VIEWS_OUT = b"V"
VIEWS_IN = b"W"
DISMISSALS = b"X"
ENGAGEMENTS = b"E"
ITEM = b"I"
ITEM_MIRROR = b"J"
# profiles (features/profile.py)
PROFILE = b"P"
# the worker's own rows (streams/work.py, streams/state.py)
PENDING = b"Q"
EMBEDDING = b"G"
PUBLISHED = b"L"
OFFSETS = b"O"
EVENT_TIME = b"T"

ROW_KINDS: tuple[RowKind, ...] = (
    RowKind("adjacency", ADJACENCY, "features/graph.py", "local user u → registers {neighbour: version}"),
    RowKind("mirror", MIRROR, "features/graph.py",
            "remote user z → registers {neighbour: version}, a copy of z's adjacency"),
    RowKind("reverse", REVERSE, "features/graph.py", "any user z → local users u whose adjacency has z alive"),
    RowKind("common", COMMON, "features/graph.py", "local user u → {v: (count << 0) | (ts << 32)}"),
    RowKind("graph_mode", GRAPH_MODE, "features/graph.py",
            "how the common-neighbour counts are kept: materialised (C rows) or on-read (one key)"),
    RowKind("views_out", VIEWS_OUT, "features/behaviour.py", "local viewer u → {viewed v: {ts}}"),
    RowKind("views_in", VIEWS_IN, "features/behaviour.py", "local user v → {viewer u: {ts}} (v was viewed by u)"),
    RowKind("dismissals", DISMISSALS, "features/behaviour.py", "local user u → {candidate: {ts}}"),
    RowKind("engagements", ENGAGEMENTS, "features/behaviour.py", "local user u → {item: first ts}"),
    RowKind("item", ITEM, "features/behaviour.py",
            "item of this partition → its engagers {user: first ts}, or the hub marker"),
    RowKind("item_mirror", ITEM_MIRROR, "features/behaviour.py",
            "item of another partition → a copy of its engagers, or the hub marker"),
    RowKind("profile", PROFILE, "features/profile.py",
            'local user → JSON {"s": sign-up ts, "f": {field: [ts, value]}}'),
    RowKind("pending", PENDING, "streams/work.py", "local user → (embedding due, list wanted, first, last touched)"),
    RowKind("embedding", EMBEDDING, "streams/work.py", "local user → its latest embedding record"),
    RowKind("published", PUBLISHED, "streams/work.py", "local user → its last published list"),
    RowKind("offsets", OFFSETS, "streams/state.py", "input topic name → the next offset to apply"),
    RowKind("event_time", EVENT_TIME, "streams/state.py", "the partition's event-time watermark (one key)"),
)
