"""The graph state of one partition: adjacency, mirrored neighbour adjacency, and common-neighbour counts.

Pure code: no Kafka. One :class:`PartitionGraph` owns the users of one partition and talks to the other
partitions only through messages it puts in its outbox (the stream glue carries them over a topic keyed by
the destination partition). The design, and why it is exact:

* **Edges are last-writer-wins registers.** Each undirected edge (x, y) has a version
  ``2·ts + (1 if remove else 0)``; a register keeps the highest version it has seen, and the edge is alive
  when that version is even. Merging is commutative, associative and idempotent, so duplicates, replays after
  a crash and events out of time order all converge to the same graph (a remove wins a tie at equal ts).
* **Each user's adjacency lives in its own partition** (``A`` rows). A connection event updates the source's
  half and sends the other half to the destination's partition.
* **Mirrors.** A partition keeps a copy (``M`` rows) of the adjacency registers of every remote user that is
  adjacent to one of its own users. The owner of x sends each change of x's registers to the partitions of
  x's neighbours (one message per partition, not per neighbour), and a full snapshot to a partition that has
  just gained its first neighbour of x. Mirrors are registers too, so they converge to the owner's copy.
* **Common-neighbour counts are materialised** (``C`` rows), keeping the invariant
  ``C[u][v] = |{z ∈ N(u) : v ∈ mirror(z)}|`` for each local u after every single register change: when u's
  own adjacency gains or loses z, C[u] changes by the neighbours of z; when the mirror of z gains or loses y,
  C[u][y] changes for each local neighbour u of z (``R`` rows, the reverse index). Once the mirrors have
  converged the counts are exactly |N(u) ∩ N(v)|.
  Or **counted on read** (``materialise_common=False``, ``PYMK_COMMON_COUNTS=on-read``): no ``C`` rows at all,
  and a count is ``|{z ∈ N(u) : v alive in mirror(z)}|`` read from the adjacency and the mirrors, like
  Adamic-Adar below. Ranking never reads the ``C`` rows (its 2-hop pass, :meth:`two_hop_arrays`, reads the
  mirrors), so what the materialised rows buy is O(1) point reads for the debug views; what they cost is up to
  ~deg² entries per user and a rewrite of each touched row at every flush, which is what breaks first at hub
  degrees (docs/capacity.md). Both modes mark the same users as "2-hop changed". A partition remembers its mode
  (one ``N`` key); opened in the other mode, it converts (:meth:`reconcile_common_rows`).
* **Hubs** (``hub_degree``, ``PYMK_HUB_DEGREE``; counts on read only): a user with more alive neighbours than
  the cap is a hub, and no 2-path runs through it — not in the 2-hop candidates, the counts, Adamic-Adar or
  resource allocation, nor in the reasons' mutual connections. A hub's register changes then mark nobody's
  2-hop as changed (the fan-out of an event at a hub drops from its degree to nothing), and a list's 2-hop pass
  reads no hub's row. Crossing the cap marks every local neighbour once. What this does to quality is measured
  by ``pymk bench hubs`` (docs/capacity.md), not assumed.
* **Adamic-Adar and Jaccard are computed exactly at read time** from the local adjacency, the mirrors and
  the mirrors' degrees (a mirror's alive count is the neighbour's current degree). Materialising Adamic-Adar
  would cost deg(z)² pair updates every time z's degree changes; reading it costs O(deg(u)) per pair or
  O(Σ_{z∈N(u)} deg(z)) for all candidates of u at once.

Cost per connection event that changes an edge (x, y): 2·(deg(x) + deg(y)) common-neighbour updates in
total (every 2-path created or destroyed, in the partitions of its endpoints), at most 2·(P − 1) mirror
messages plus 2 halves, and one degree update per endpoint; a snapshot of deg(x) registers when a partition
sees its first neighbour of x.
"""

from __future__ import annotations

import math
import sys
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from pymk.features.activity import activity_values
from pymk.features.keyspace import ADJACENCY, COMMON, GRAPH_MODE, MIRROR, REVERSE  # the rows: features/keyspace.py
from pymk.features.storage import RowStore, evict_oldest_rows, row_cache_bytes, row_key

_UINT32 = next(code for code in "IL" if array(code).itemsize == 4)  # "I" on every platform we know


def edge_version(ts: int, action: str) -> int:
    """The register version of a connection event; higher wins; odd means removed."""
    return 2 * ts + (1 if action == "remove" else 0)


def is_alive(version: int) -> bool:
    return version % 2 == 0


def version_ts(version: int) -> int:
    return version >> 1


def adamic_adar_weight(degree: int) -> float:
    """1/ln(deg) of a common neighbour; a neighbour of degree 1 (or 0) contributes 0."""
    return 1.0 / math.log(degree) if degree > 1 else 0.0


class TwoHopArrays(NamedTuple):
    """Every user at the end of a 2-path from a query user — the same set as :meth:`PartitionGraph.two_hop_scores`:
    the users at distance 2, and the neighbours that share a neighbour with it — as parallel arrays ordered by id:
    common-neighbour count, Adamic-Adar and resource-allocation sums. The ranking source keeps distance 2 only."""

    ids: np.ndarray  # int64, ascending
    counts: np.ndarray  # int64
    adamic_adar: np.ndarray  # float64
    resource_allocation: np.ndarray  # float64

    @classmethod
    def empty(cls) -> TwoHopArrays:
        return cls(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0), np.empty(0))


class OwnershipError(LookupError):
    """A read or write of a user that another partition owns."""


# ---- messages between partitions -------------------------------------------------------------------------
@dataclass(frozen=True)
class EdgeHalf:
    """Apply the register (owner, other) to owner's adjacency (sent to owner's partition)."""

    owner: int
    other: int
    version: int


@dataclass(frozen=True)
class MirrorUpdate:
    """Registers of ``node``'s adjacency for the mirror at the destination partition (a delta or a snapshot)."""

    node: int
    registers: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class DegreeUpdate:
    """A user's new degree, for the table every worker keeps of all degrees. ``version`` (the sum of the
    user's register versions) grows with every change, so the newest wins whatever the arrival order."""

    user: int
    degree: int
    version: int
    ts: int
    # when the user last connected or disconnected (the largest ts of their registers), and their decayed
    # connection activity at that anchor (features/activity.py)
    last_ts: int = 0
    activity: tuple[float, ...] = ()


PartitionMessage = EdgeHalf | MirrorUpdate


# ---- rows --------------------------------------------------------------------------------------------------
class Registers:
    """Edge registers of one user: neighbour → version, with the alive count and version sum kept current."""

    __slots__ = ("versions", "alive", "version_sum", "_alive_ids")

    def __init__(self, versions: dict[int, int] | None = None) -> None:
        self.versions: dict[int, int] = versions or {}
        self.alive = sum(1 for v in self.versions.values() if v % 2 == 0)
        # Σ (version + 1): strictly grows with every change, a new register at version 0 included.
        self.version_sum = sum(self.versions.values()) + len(self.versions)
        self._alive_ids: np.ndarray | None = None  # alive_ids(), made at the first read after a change

    def merge(self, neighbour: int, version: int) -> tuple[bool, bool] | None:
        """Apply a register; None when it changes nothing, else (was_alive, now_alive)."""
        old = self.versions.get(neighbour)
        if old is not None and old >= version:
            return None
        was_alive = old is not None and old % 2 == 0
        now_alive = version % 2 == 0
        self.versions[neighbour] = version
        self._alive_ids = None
        self.version_sum += version - old if old is not None else version + 1
        self.alive += int(now_alive) - int(was_alive)
        return was_alive, now_alive

    def alive_ids(self) -> np.ndarray:
        """The alive neighbours as an int64 array (in register order), kept until the next change: a 2-hop
        traversal reads every neighbour's row of every list, and converting a row costs far more than keeping it."""
        ids = self._alive_ids
        if ids is None:
            ids = self._alive_ids = np.fromiter((n for n, v in self.versions.items() if v % 2 == 0), np.int64)
            ids.flags.writeable = False  # shared by every reader until the next change
        return ids

    def kept_bytes(self) -> int:
        """Memory of the kept :meth:`alive_ids` array (0 when none is kept), for the row cache's budget."""
        return 0 if self._alive_ids is None else sys.getsizeof(self._alive_ids)

    def alive_items(self) -> Iterator[tuple[int, int]]:
        return ((n, v) for n, v in self.versions.items() if v % 2 == 0)

    def encode(self) -> bytes:
        data = np.empty(2 * len(self.versions), dtype=np.uint64)
        data[0::2] = list(self.versions.keys())
        data[1::2] = list(self.versions.values())
        return data.tobytes()

    @classmethod
    def decode(cls, raw: bytes) -> Registers:
        data = np.frombuffer(raw, dtype=np.uint64)
        return cls(dict(zip(data[0::2].tolist(), data[1::2].tolist(), strict=True)))


def _encode_ids(ids: Iterable[int]) -> bytes:
    return np.fromiter(ids, dtype=np.uint64).tobytes()


def _decode_ids(raw: bytes) -> set[int]:
    return set(np.frombuffer(raw, dtype=np.uint64).tolist())


class CommonRow:
    """One user's materialised common-neighbour row: 2-hop candidate → count, and the ts of the event that last
    changed it. Columns in ``array`` buffers (ids, counts, stamps; a candidate's position in ``position``), so that
    the row a flush writes is three buffer copies. Rewriting it from Python values at every flush took ~11 % of a
    worker's time at 200 events/s (py-spy; one dict of packed ``ts << 32 | count`` ints through object arrays), and
    ~7 % as two dicts through ``np.fromiter``: every touched row is written whole, and 2-hop rows are long.
    A dropped candidate's slot takes the last one (the order of the columns means nothing)."""

    __slots__ = ("position", "ids", "counts", "stamps")

    def __init__(self) -> None:
        self.position: dict[int, int] = {}
        self.ids = array("Q")
        self.counts = array(_UINT32)
        self.stamps = array("Q")

    def __len__(self) -> int:
        return len(self.ids)

    def count_by_candidate(self) -> dict[int, int]:
        return dict(zip(self.ids, self.counts, strict=True))

    def get(self, candidate: int) -> tuple[int, int] | None:
        """(count, ts) of a candidate with at least one common neighbour, else None."""
        i = self.position.get(candidate)
        return None if i is None else (self.counts[i], self.stamps[i])

    def add(self, candidate: int, sign: int, ts: int) -> int:
        """The count moved by ``sign`` at ``ts`` (the candidate dropped at 0); the new count (negative: unchanged,
        an invariant broken)."""
        i = self.position.get(candidate)
        if i is None:
            if sign > 0:
                self.position[candidate] = len(self.ids)
                self.ids.append(candidate)
                self.counts.append(sign)
                self.stamps.append(ts)
            return sign
        count = self.counts[i] + sign
        if count > 0:
            self.counts[i] = count
            self.stamps[i] = ts
        elif count == 0:
            del self.position[candidate]
            last_id, last_count, last_stamp = self.ids.pop(), self.counts.pop(), self.stamps.pop()
            if i < len(self.ids):  # the last row fills the hole
                self.ids[i], self.counts[i], self.stamps[i] = last_id, last_count, last_stamp
                self.position[last_id] = i
        return count

    def encode(self) -> bytes:
        """n (uint32), ids (uint64 × n), stamps (uint64 × n), counts (uint32 × n), in the machine's byte order (as
        the other rows' numpy buffers)."""
        return (len(self.ids).to_bytes(4, sys.byteorder) + self.ids.tobytes() + self.stamps.tobytes()
                + self.counts.tobytes())

    @classmethod
    def decode(cls, raw: bytes) -> CommonRow:
        row = cls()
        n = int.from_bytes(raw[:4], sys.byteorder)
        row.ids.frombytes(raw[4 : 4 + 8 * n])
        row.stamps.frombytes(raw[4 + 8 * n : 4 + 16 * n])
        row.counts.frombytes(raw[4 + 16 * n : 4 + 20 * n])
        row.position = dict(zip(row.ids, range(n), strict=True))
        return row


@dataclass
class GraphStats:
    edge_changes: int = 0  # register changes applied to local adjacency
    mirror_changes: int = 0  # register changes applied to mirrors
    pair_updates: int = 0  # common-neighbour count increments and decrements (materialised rows)
    two_hop_marks: int = 0  # the same 2-path changes when counts are read on demand: only the user is marked
    messages_out: int = 0


@dataclass
class _Outbox:
    partitions: dict[int, list[PartitionMessage]] = field(default_factory=dict)
    degrees: dict[int, DegreeUpdate] = field(default_factory=dict)


class PartitionGraph:
    """Graph state of the users of one partition over a :class:`RowStore` (see the module doc)."""

    def __init__(self, partition: int, partitions: int, store: RowStore,
                 partition_of: Callable[[int], int], max_cached_rows: int = 2_000_000,
                 materialise_common: bool = True, hub_degree: int = 0) -> None:
        if hub_degree and materialise_common:
            raise ValueError("a hub degree (PYMK_HUB_DEGREE) needs the counts read on demand "
                             "(PYMK_COMMON_COUNTS=on-read): materialised rows would have to drop a hub's 2-paths")
        self.partition = partition
        self.materialise_common = materialise_common
        # users of more alive neighbours than this are hubs: no 2-path runs through one (0: no hubs; see the
        # module doc)
        self.hub_degree = hub_degree
        self.partitions = partitions
        self.store = store
        self.partition_of = partition_of
        self.max_cached_rows = max_cached_rows
        self.stats = GraphStats()
        self._adjacency: dict[int, Registers] = {}
        self._mirror: dict[int, Registers] = {}
        self._reverse: dict[int, set[int]] = {}
        self._common: dict[int, CommonRow] = {}
        self._dirty: set[tuple[bytes, int]] = set()
        # changes not yet taken by the refresher (take_changed_users), apart from the dirty rows: the refresher
        # may take them between two flushes, and a user changed again after that must be seen again
        self._changed_own: set[int] = set()
        self._changed_two_hop: set[int] = set()
        self._outbox = _Outbox()
        # local user → (activity at the anchor, anchor): recomputed at every change of the user's registers,
        # read for every candidate of every list
        self._activity: dict[int, tuple[tuple[float, ...], int]] = {}

    # ---- row access (write-back cache over the store) -------------------------------------------------
    def _load_registers(self, cache: dict[int, Registers], kind: bytes, user: int) -> Registers:
        row = cache.get(user)
        if row is None:
            raw = self.store.get(row_key(kind, user))
            row = Registers.decode(raw) if raw is not None else Registers()
            cache[user] = row
        return row

    def _check_local(self, user: int) -> None:
        # Reading another partition's user here would silently give an empty row (faust's pitfall with
        # tables); its state lives elsewhere, so this is always a bug in the caller.
        if self.partition_of(user) != self.partition:
            raise OwnershipError(f"user {user} belongs to partition {self.partition_of(user)}, not {self.partition}")

    def adjacency_row(self, user: int) -> Registers:
        self._check_local(user)
        return self._load_registers(self._adjacency, ADJACENCY, user)

    def mirror_row(self, node: int) -> Registers:
        """The registers of ``node``'s adjacency as this partition knows them (its own, for a local node)."""
        if self.partition_of(node) == self.partition:
            return self.adjacency_row(node)
        return self._load_registers(self._mirror, MIRROR, node)

    def reverse_row(self, node: int) -> set[int]:
        row = self._reverse.get(node)
        if row is None:
            raw = self.store.get(row_key(REVERSE, node))
            row = _decode_ids(raw) if raw is not None else set()
            self._reverse[node] = row
        return row

    def common_row(self, user: int) -> CommonRow:
        """The materialised row (candidate → count, and ts); read-only outside this class."""
        self._check_local(user)
        if not self.materialise_common:
            raise RuntimeError("common-neighbour rows are not kept (counts on read): use common_neighbor_counts")
        row = self._common.get(user)
        if row is None:
            raw = self.store.get(row_key(COMMON, user))
            row = CommonRow.decode(raw) if raw is not None else CommonRow()
            self._common[user] = row
        return row

    # ---- the counts' mode ----------------------------------------------------------------------------------
    def reconcile_common_rows(self) -> str | None:
        """Bring a partition written in the other mode to this one (nothing to do when it is the same): drop every
        ``C`` row when counts are now read on demand, or build them from the adjacency and the mirrors when they
        are now materialised (each with the on-read ts, :meth:`common_neighbor_count`). A store without the mode
        key predates it, when the rows were always materialised. Returns what was done, if anything."""
        assert not self._dirty, "reconcile before applying anything"
        mode = b"materialised" if self.materialise_common else b"on-read"
        stored = self.store.get(GRAPH_MODE)
        if stored == mode:
            return None
        puts: dict[bytes, bytes] = {GRAPH_MODE: mode}
        deletes: list[bytes] = []
        if self.materialise_common and stored is not None:  # on-read → materialised
            for user in sorted(self.local_users()):  # listed first: the reads below fill the row cache
                row = CommonRow()
                for candidate in self.two_hop_arrays(user).ids.tolist():
                    count, ts = self._count_on_read(user, candidate)
                    row.add(candidate, count, ts or 0)
                if row:
                    puts[row_key(COMMON, user)] = row.encode()
        elif not self.materialise_common:  # materialised → on-read
            deletes = [key for key, _ in self.store.scan(COMMON)]
        self.store.write(puts, deletes)  # one batch: a crash leaves the old mode, and this runs again
        self._common.clear()
        if len(puts) > 1:
            return f"built {len(puts) - 1} common-neighbour rows"
        return f"dropped {len(deletes)} common-neighbour rows" if deletes else None

    # ---- applying events and messages ------------------------------------------------------------------
    def apply_connection(self, src: int, dst: int, action: str, ts: int) -> None:
        """A connection event (any partition may receive it: halves owned elsewhere are sent on)."""
        version = edge_version(ts, action)
        for owner, other in ((src, dst), (dst, src)):
            if self.partition_of(owner) == self.partition:
                self.apply_edge_half(owner, other, version)
            else:
                self._send(self.partition_of(owner), EdgeHalf(owner, other, version))

    def apply_message(self, message: PartitionMessage) -> None:
        if isinstance(message, EdgeHalf):
            self.apply_edge_half(message.owner, message.other, message.version)
        else:
            self.apply_mirror(message.node, message.registers)

    def _is_hub(self, row: Registers) -> bool:
        return 0 < self.hub_degree < row.alive

    def _hub_changed(self, node: int) -> None:
        """``node`` became a hub or stopped being one: every 2-path through it appeared or vanished at once."""
        for user in self.reverse_row(node):
            self._changed_two_hop.add(user)
            self.stats.two_hop_marks += 1

    def apply_edge_half(self, owner: int, other: int, version: int) -> None:
        row = self.adjacency_row(owner)
        before = self._neighbour_partitions(row)
        was_hub = self._is_hub(row)
        change = row.merge(other, version)
        if change is None:
            return  # a duplicate or an older event: nothing changes, nothing is sent
        self.stats.edge_changes += 1
        self._dirty.add((ADJACENCY, owner))
        self._changed_own.add(owner)
        was_alive, now_alive = change
        ts = version_ts(version)
        if was_alive != now_alive:
            sign = 1 if now_alive else -1
            # owner's own 2-paths through `other` (none through a hub)
            other_row = self.mirror_row(other)
            if not self._is_hub(other_row):
                # a 2-path is completed by the later of its two edges, whichever arrived last
                self._add_commons_of(owner, [(w, ts if sign < 0 else max(ts, version_ts(v)))
                                             for w, v in other_row.versions.items() if v % 2 == 0 and w != owner],
                                     sign)
            reverse = self.reverse_row(other)
            (reverse.add if now_alive else reverse.discard)(owner)
            self._dirty.add((REVERSE, other))
            # local users adjacent to `owner` see `other` appear or vanish at distance 2
            if was_hub != self._is_hub(row):
                self._hub_changed(owner)
            elif not was_hub:
                self._mirror_changed(owner, other, sign, ts)
        # any register change moves the last-connection time or the activity: every worker learns it
        update = self._outbox.degrees[owner] = self.degree_update(owner, row, ts)
        self._activity[owner] = (update.activity, update.last_ts)
        # Adding `other` can add only its partition, removing only shrink the set: so these are all the
        # partitions that had or have a neighbour of `owner`.
        targets = (before | {self.partition_of(other)}) - {self.partition}
        for target in targets:
            if target in before:
                self._send(target, MirrorUpdate(owner, ((other, version),)))
            else:  # that partition may hold no copy, or a stale one: send every register
                self._send(target, MirrorUpdate(owner, tuple(row.versions.items())))

    def apply_mirror(self, node: int, registers: Iterable[tuple[int, int]]) -> None:
        if self.partition_of(node) == self.partition:
            return  # the owner's own adjacency is the authority here
        row = self._load_registers(self._mirror, MIRROR, node)
        was_hub = self._is_hub(row)
        flips: list[tuple[int, int, int]] = []
        for neighbour, version in registers:
            change = row.merge(neighbour, version)
            if change is None:
                continue
            self.stats.mirror_changes += 1
            self._dirty.add((MIRROR, node))
            was_alive, now_alive = change
            if was_alive != now_alive:
                flips.append((neighbour, 1 if now_alive else -1, version_ts(version)))
        if was_hub != self._is_hub(row):
            self._hub_changed(node)
        elif not was_hub:  # no 2-path runs through a hub: its registers' changes move no count
            for neighbour, sign, ts in flips:
                self._mirror_changed(node, neighbour, sign, ts)

    def _mirror_changed(self, node: int, neighbour: int, sign: int, ts: int) -> None:
        """``node``'s edge to ``neighbour`` came or went: every local user adjacent to ``node`` (but ``neighbour``)
        sees ``neighbour`` at distance 2 once more or once less. The pair loop of a connection's replay (~210 pairs
        an edge on ego-Facebook): rows come from the caches directly, once loaded (and checked local) by
        :meth:`common_row` / :meth:`adjacency_row`, which a user of :meth:`reverse_row` always is."""
        users = [user for user in self.reverse_row(node) if user != neighbour]
        if not self.materialise_common:
            self._changed_two_hop.update(users)
            self.stats.two_hop_marks += len(users)
            return
        common, adjacency, dirty = self._common, self._adjacency, self._dirty
        for user in users:
            if sign > 0:  # dated by the later edge of the 2-path (as above)
                registers = adjacency.get(user) or self.adjacency_row(user)
                when = max(ts, version_ts(registers.versions[node]))
            else:
                when = ts
            row = common.get(user) or self.common_row(user)
            if row.add(neighbour, sign, when) < 0:
                raise AssertionError(f"common-neighbour count of ({user}, {neighbour}) went negative")
            dirty.add((COMMON, user))
        self._changed_two_hop.update(users)
        self.stats.pair_updates += len(users)

    def _add_commons_of(self, user: int, candidates: list[tuple[int, int]], sign: int) -> None:
        """``user``'s count of each candidate moved by ``sign``, dated by its ts ((candidate, ts) pairs)."""
        if not candidates:
            return
        if not self.materialise_common:
            self._changed_two_hop.add(user)
            self.stats.two_hop_marks += len(candidates)
            return
        row = self.common_row(user)
        for candidate, ts in candidates:
            if row.add(candidate, sign, ts) < 0:
                raise AssertionError(f"common-neighbour count of ({user}, {candidate}) went negative")
        self._dirty.add((COMMON, user))
        self._changed_two_hop.add(user)
        self.stats.pair_updates += len(candidates)

    def _neighbour_partitions(self, row: Registers) -> set[int]:
        partition_of = self.partition_of
        return {partition_of(n) for n, v in row.versions.items() if v % 2 == 0}

    def _send(self, partition: int, message: PartitionMessage) -> None:
        self._outbox.partitions.setdefault(partition, []).append(message)
        self.stats.messages_out += 1

    # ---- commit -----------------------------------------------------------------------------------------
    def take_outbox(self) -> tuple[dict[int, list[PartitionMessage]], list[DegreeUpdate]]:
        """Messages for other partitions and degree updates produced since the last call."""
        outbox, self._outbox = self._outbox, _Outbox()
        return outbox.partitions, list(outbox.degrees.values())

    def dirty_rows(self) -> tuple[dict[bytes, bytes], list[bytes]]:
        """The puts and deletes that persist every change since the last :meth:`mark_clean`."""
        puts: dict[bytes, bytes] = {}
        deletes: list[bytes] = []
        for kind, user in self._dirty:
            key = row_key(kind, user)
            if kind == ADJACENCY:
                puts[key] = self._adjacency[user].encode()
            elif kind == MIRROR:
                puts[key] = self._mirror[user].encode()
            elif kind == REVERSE:
                ids = self._reverse[user]
                if ids:
                    puts[key] = _encode_ids(ids)
                else:
                    deletes.append(key)
            else:
                row = self._common[user]
                if row:
                    puts[key] = row.encode()
                else:
                    deletes.append(key)
        return puts, deletes

    def take_changed_users(self) -> tuple[set[int], set[int]]:
        """Since the last take: local users whose adjacency changed, and local users whose common-neighbour row
        changed (their 2-hop candidates did)."""
        own, self._changed_own = self._changed_own, set()
        two_hop, self._changed_two_hop = self._changed_two_hop, set()
        return own, two_hop

    def mark_clean(self) -> None:
        """The dirty rows are durable; forget them, and drop the cache when it has grown past its bound."""
        self._dirty.clear()
        cached = len(self._adjacency) + len(self._mirror) + len(self._reverse) + len(self._common)
        if cached > self.max_cached_rows:
            self.drop_cache()

    def cached_rows(self) -> int:
        """How many rows are cached (a few ``len()``: cheap enough for every flush)."""
        return len(self._adjacency) + len(self._mirror) + len(self._reverse) + len(self._common) + len(self._activity)

    def cached_bytes(self) -> int:
        """Approximate memory of the cached rows (:func:`pymk.features.storage.row_cache_bytes`)."""
        rows = self.cached_rows()
        registers = (*self._adjacency.values(), *self._mirror.values())
        entries = (sum(len(row.versions) for row in registers)
                   + sum(map(len, self._reverse.values())) + sum(map(len, self._common.values())))
        return row_cache_bytes(rows, entries) + sum(row.kept_bytes() for row in registers)

    def drop_cache(self) -> None:
        """Forget every cached row (only when none is dirty: they are all in the store)."""
        self.evict_oldest(1.0)

    def evict_oldest(self, fraction: float) -> None:
        """Forget the oldest-loaded ``fraction`` of each cache (only when no row is dirty)."""
        assert not self._dirty, "evicting dirty rows would lose them"
        for cache in (self._adjacency, self._mirror, self._reverse, self._common, self._activity):
            evict_oldest_rows(cache, fraction)

    def flush(self) -> int:
        """Write every dirty row in one atomic batch (for callers with nothing else to commit)."""
        puts, deletes = self.dirty_rows()
        self.store.write(puts, deletes)
        self.mark_clean()
        return len(puts) + len(deletes)

    # ---- reads --------------------------------------------------------------------------------------------
    def neighbours(self, user: int) -> dict[int, int]:
        """Alive neighbours of a local user → the ts of the event that made the edge."""
        return {n: version_ts(v) for n, v in self.adjacency_row(user).alive_items()}

    def degree(self, user: int) -> int:
        return self.adjacency_row(user).alive

    @staticmethod
    def degree_update(owner: int, row: Registers, ts: int) -> DegreeUpdate:
        last = version_ts(max(row.versions.values())) if row.versions else ts
        return DegreeUpdate(owner, row.alive, row.version_sum, ts, last,
                            activity_values((version_ts(v) for _, v in row.alive_items()), last))

    def connection_activity(self, user: int) -> tuple[tuple[float, ...], int] | None:
        """(decayed activity at the anchor, anchor = last connection ts) of a local user; None if none."""
        held = self._activity.get(user)
        if held is None:
            row = self.adjacency_row(user)
            if not row.versions:
                return None
            update = self.degree_update(user, row, 0)
            held = self._activity[user] = (update.activity, update.last_ts)
        return held

    def degree_with_ts(self, user: int) -> tuple[int, int | None]:
        """(degree, ts of the last change of any of the user's edges)."""
        row = self.adjacency_row(user)
        return row.alive, (version_ts(max(row.versions.values())) if row.versions else None)

    def common_neighbor_count(self, user: int, candidate: int) -> tuple[int, int | None]:
        """(count, ts of the event that last changed it) for a local user.

        Counted on read, the ts is when the newest of the current 2-paths was completed (the later of its two
        edges): exact while edges are only added, but a removal since then lowered the count undated, as no
        history is kept. None when there is no common neighbour, in both modes."""
        if not self.materialise_common:
            return self._count_on_read(user, candidate)
        found = self.common_row(user).get(candidate)
        return (0, None) if found is None else found

    def _count_on_read(self, user: int, candidate: int) -> tuple[int, int | None]:
        if candidate == user:
            return 0, None
        count, newest = 0, -1
        for z, version in self.adjacency_row(user).alive_items():
            mirror = self.mirror_row(z)
            if self._is_hub(mirror):
                continue
            other = mirror.versions.get(candidate)
            if other is not None and other % 2 == 0 and z != candidate:
                count += 1
                newest = max(newest, version_ts(version), version_ts(other))
        return (count, newest) if count else (0, None)

    def common_neighbor_counts(self, user: int) -> dict[int, int]:
        """Every candidate with at least one common neighbour → the count (direct neighbours included)."""
        if not self.materialise_common:
            self._check_local(user)
            found = self.two_hop_arrays(user)
            return dict(zip(found.ids.tolist(), found.counts.tolist(), strict=True))
        return self.common_row(user).count_by_candidate()

    def common_neighbors(self, user: int, candidate: int) -> list[int]:
        """The common neighbours themselves (for reasons), from the local adjacency and the mirrors."""
        found = []
        for z, _ in self.adjacency_row(user).alive_items():
            mirror = self.mirror_row(z)
            if is_alive(mirror.versions.get(candidate, 1)) and not self._is_hub(mirror):
                found.append(z)
        return sorted(found)

    def adamic_adar_score(self, user: int, candidate: int) -> float:
        """Σ 1/ln deg(z) over common neighbours z, exact, with degrees as of now."""
        total = 0.0
        for z in self.common_neighbors(user, candidate):
            total += adamic_adar_weight(self.mirror_row(z).alive)
        return total

    def _sorted_neighbours(self, user: int) -> list[int]:
        """The user's neighbours by id. Float sums over them (Adamic-Adar, resource allocation) are then
        added in one order whatever order the registers arrived in, so a replay after a crash, another
        worker, or :meth:`adamic_adar_score` get the same bits (the arrival order depends on timing)."""
        return sorted(z for z, _ in self.adjacency_row(user).alive_items())

    def neighbour_rows(self, user: int) -> list[tuple[int, Registers]]:
        """(z, z's registers as mirrored here) of the local user's alive neighbours z, by id: what a user's 2-hop
        reads are made of (read once per list, then :meth:`common_neighbors` of many candidates is a lookup each).
        Hubs left out: no 2-path runs through one (``hub_degree``)."""
        rows = [(z, self.mirror_row(z)) for z in self._sorted_neighbours(user)]
        return [(z, row) for z, row in rows if not self._is_hub(row)] if self.hub_degree else rows

    def two_hop_scores(self, user: int) -> tuple[dict[int, int], dict[int, float]]:
        """Common-neighbour counts and Adamic-Adar scores of every candidate of a local user, in one pass."""
        counts: dict[int, int] = {}
        scores: dict[int, float] = {}
        for z in self._sorted_neighbours(user):
            mirror = self.mirror_row(z)
            if self._is_hub(mirror):
                continue
            weight = adamic_adar_weight(mirror.alive)
            for w, v in mirror.versions.items():
                if v % 2 == 0 and w != user:
                    counts[w] = counts.get(w, 0) + 1
                    scores[w] = scores.get(w, 0.0) + weight
        return counts, scores

    def two_hop_with_allocation(self, user: int) -> tuple[dict[int, int], dict[int, float], dict[int, float]]:
        """:meth:`two_hop_scores` and resource allocation (Σ 1/deg z over common neighbours z) in one pass."""
        counts: dict[int, int] = {}
        scores: dict[int, float] = {}
        allocation: dict[int, float] = {}
        for z in self._sorted_neighbours(user):
            mirror = self.mirror_row(z)
            if self._is_hub(mirror):
                continue
            weight = adamic_adar_weight(mirror.alive)
            share = 1.0 / mirror.alive if mirror.alive else 0.0
            for w, v in mirror.versions.items():
                if v % 2 == 0 and w != user:
                    if w in counts:
                        counts[w] += 1
                        scores[w] += weight
                        allocation[w] += share
                    else:
                        counts[w] = 1
                        scores[w] = weight
                        allocation[w] = share
        return counts, scores, allocation

    def two_hop_arrays(self, user: int) -> TwoHopArrays:
        """:meth:`two_hop_with_allocation` as arrays, without a Python step per 2-path: each neighbour's alive
        neighbours come as a kept array (:meth:`Registers.alive_ids`), and the sums are ``np.bincount`` with
        weights, which adds each candidate's terms one by one in input order — the neighbours' id order, as the
        dict loop does — so every sum has the same bits."""
        rows = [row for _, row in self.neighbour_rows(user)]
        if not rows:
            return TwoHopArrays.empty()
        neighbours = [row.alive_ids() for row in rows]
        sizes = np.fromiter(map(len, neighbours), np.int64, len(rows))
        others = np.concatenate(neighbours)
        keep = others != user
        degrees = [row.alive for row in rows]
        adamic_adar = np.repeat(np.array([adamic_adar_weight(d) for d in degrees], np.float64), sizes)[keep]
        allocation = np.repeat(np.array([1.0 / d if d else 0.0 for d in degrees], np.float64), sizes)[keep]
        ids, inverse = np.unique(others[keep], return_inverse=True)
        n = len(ids)
        return TwoHopArrays(ids, np.bincount(inverse, minlength=n).astype(np.int64),
                            np.bincount(inverse, adamic_adar, minlength=n),
                            np.bincount(inverse, allocation, minlength=n))

    def has_user(self, user: int) -> bool:
        """Whether some event gave the local ``user`` adjacency state (a register, alive or removed). Reads without
        caching: a debug query about a user no event named must leave nothing behind."""
        row = self._adjacency.get(user)
        if row is not None:
            return bool(row.versions)
        return self.store.get(row_key(ADJACENCY, user)) is not None

    def local_users(self) -> Iterator[int]:
        """Every local user with adjacency state (from the store and the cache; an empty row cached by a read of a
        user no event named is not one)."""
        from pymk.features.storage import row_user

        seen = {user for user, row in self._adjacency.items() if row.versions}
        yield from seen
        for key, _ in self.store.scan(ADJACENCY):
            user = row_user(key)
            if user not in seen and user not in self._adjacency:  # a cached empty row is newer than none stored
                yield user
