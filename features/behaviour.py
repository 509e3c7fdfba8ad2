"""Behavioural state of the local users of one partition: profile views, dismissals and content engagement.

Pure code: no Kafka. Events are keyed by their first user (the viewer, the dismissing user, the engaging
user) and land in that user's partition; facts that concern another user or an item are sent on as
messages in the outbox (per destination partition, like :mod:`pymk.features.graph`), and the stream glue
delivers them to :meth:`PartitionBehaviour.apply_message` at the destination. The design, and why it is
exact:

* **Sets, not counters.** Every view and dismissal is stored as its ts in a set per (user, other user); an
  engagement as the first ts per (user, item) (a minimum). Set union and minimum are commutative,
  associative and idempotent, so a duplicate event (same fields, same ts), a replay after a crash or any
  arrival order leaves the same state. A count is the size of a set: "distinct views" are distinct ts.
* **Views both ways.** The viewer's partition keeps u→v (``V`` rows) and sends :class:`InboundView` to the
  viewed user's partition, which keeps "v was viewed by u" (``W`` rows). So both directions of a pair are
  readable at either user's partition.
* **Items are like graph middle nodes.** An item's engager set (``I`` rows, user → first ts) lives at
  ``partition_of(item)``. A user's partition keeps the user's own items (``E`` rows) and sends
  :class:`ItemEngagement` to the item's partition; that partition sends every change of the engager set to
  the partitions of the item's engagers (one :class:`ItemMirrorUpdate` per partition), and a full snapshot
  to a partition that has just gained its first engager of the item. Those partitions keep mirrors
  (``J`` rows). Mirrors only grow by minimum-merges, so they converge to the owner's copy. Then
  ``co_engaged(u, v) = Σ_{i ∈ items(u)} [v ∈ mirror(i)]`` is computed at u's partition at read time, at a
  cost of Σ |engagers(i)| over u's items for all candidates at once.
* **Hub items** (viral content: huge engager sets) cost O(|engagers|) per engagement (a row rewrite, a
  partition scan) and make every co-engagement read of their engagers slow. With ``max_item_fanout`` set,
  an item with more engagers than that becomes a *hub*: the owner drops its engager set, sends a hub marker
  to every partition that mirrors it, and stops mirroring it. A hub is terminal (the set is gone, so later
  engagements of it change nothing but the engager's own item set). The owner answers an engagement of a
  hub with the marker, so every partition with an engager of a hub learns it and stops sending engagements
  of it: a viral item then costs about one message per partition, not one per engagement. Hub items are
  not counted, so co-engagement becomes a lower bound of the exact count: once messages are delivered, it
  is exactly the number of common items that have at most ``max_item_fanout`` engagers (and before, never
  more than that). That is also what it should measure: sharing a viral item says little about two people.
  Raising the setting later does not bring hubs back; lowering it applies at an item's next engagement.

Every feature value comes with the ts of the event that last changed it, in event time: for a count of a
ts set, its largest ts; for ``mutual_profile_views = min(|A|, |B|)``, the ts at which the minimum reached
its value (``max(A[k-1], B[k-1])`` of the sorted sets, k the minimum); for co-engagement, the largest
``max(first ts of u, first ts of v)`` over the items counted.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from itertools import chain, repeat

import numpy as np

from pymk.events import DismissalEvent, EngagementEvent, ProfileViewEvent
from pymk.features.change_clock import CHANGE_CLOCK, ChangeClock
from pymk.features.keyspace import (  # the rows: features/keyspace.py
    DISMISSALS,
    ENGAGEMENTS,
    ITEM,
    ITEM_MIRROR,
    VIEWS_IN,
    VIEWS_OUT,
)
from pymk.features.storage import RowStore, evict_oldest_rows, row_cache_bytes, row_key

DAY_MS = 86_400_000
_STAMP_KINDS = (VIEWS_OUT, VIEWS_IN, DISMISSALS)


# ---- messages between partitions -------------------------------------------------------------------------
@dataclass(frozen=True)
class InboundView:
    """``viewer`` viewed ``viewed`` at ts (sent to the viewed user's partition)."""

    viewed: int
    viewer: int
    ts: int


@dataclass(frozen=True)
class ItemEngagement:
    """``user`` engaged with ``item`` at ts (sent to the item's partition, which owns its engager set)."""

    item: int
    user: int
    ts: int


@dataclass(frozen=True)
class ItemMirrorUpdate:
    """Engagers (user, first ts) of ``item`` for the mirror at the destination (a delta or a snapshot), or,
    with ``hub``, the marker that the item has too many engagers to be mirrored any more."""

    item: int
    engagers: tuple[tuple[int, int], ...]
    hub: bool = False


BehaviourMessage = InboundView | ItemEngagement | ItemMirrorUpdate


# ---- rows --------------------------------------------------------------------------------------------------
def _encode_stamps(row: dict[int, set[int]]) -> bytes:
    """[n][ids × n][set sizes × n][every ts, sorted per id], all uint64."""
    ids = list(row)
    sizes = [len(row[i]) for i in ids]
    flat = [t for i in ids for t in sorted(row[i])]
    return np.array([len(ids), *ids, *sizes, *flat], dtype=np.uint64).tobytes()


def _decode_stamps(raw: bytes) -> dict[int, set[int]]:
    data = np.frombuffer(raw, dtype=np.uint64).tolist()
    n = data[0]
    ids, sizes, flat = data[1:1 + n], data[1 + n:1 + 2 * n], data[1 + 2 * n:]
    out: dict[int, set[int]] = {}
    start = 0
    for i, size in zip(ids, sizes, strict=True):
        out[i] = set(flat[start:start + size])
        start += size
    return out


def _encode_pairs(row: dict[int, int]) -> bytes:
    return np.fromiter((x for item in row.items() for x in item), dtype=np.uint64, count=2 * len(row)).tobytes()


def _decode_pairs(raw: bytes) -> dict[int, int]:
    data = np.frombuffer(raw, dtype=np.uint64)
    return dict(zip(data[0::2].tolist(), data[1::2].tolist(), strict=True))


class ItemEngagers:
    """The engagers of one item (user → first ts), or the hub marker (then no engagers are kept)."""

    __slots__ = ("engagers", "hub")

    def __init__(self, engagers: dict[int, int] | None = None, hub: bool = False) -> None:
        self.engagers: dict[int, int] = {} if hub else (engagers or {})
        self.hub = hub

    def merge(self, user: int, ts: int) -> bool:
        """Keep the earliest ts of each engager; True when that changed something."""
        if self.hub:
            return False
        old = self.engagers.get(user)
        if old is not None and old <= ts:
            return False
        self.engagers[user] = ts
        return True

    def make_hub(self) -> bool:
        if self.hub:
            return False
        self.hub = True
        self.engagers = {}
        return True

    def encode(self) -> bytes:
        return np.uint64(int(self.hub)).tobytes() + _encode_pairs(self.engagers)

    @classmethod
    def decode(cls, raw: bytes) -> ItemEngagers:
        hub = bool(np.frombuffer(raw, dtype=np.uint64, count=1)[0])
        return cls(_decode_pairs(raw[8:]), hub=hub)


_EMPTY_STAMPS: frozenset[int] = frozenset()


@dataclass
class BehaviourStats:
    views: int = 0  # new u→v view ts stored at the viewer's partition
    inbound_views: int = 0  # new inbound view ts stored at the viewed user's partition
    dismissals: int = 0  # new dismissal ts
    engagements: int = 0  # new (or earlier) first engagement ts of a (user, item)
    duplicates: int = 0  # events and messages that changed nothing
    item_changes: int = 0  # changes of owned engager sets
    mirror_changes: int = 0  # changes of mirrored engager sets
    hub_items: int = 0  # owned items that became hubs
    messages_out: int = 0


@dataclass
class _Outbox:
    partitions: dict[int, list[BehaviourMessage]] = field(default_factory=dict)


class PartitionBehaviour:
    """Behavioural state of the users (and items) of one partition over a :class:`RowStore` (see the
    module doc). ``max_item_fanout``: None counts co-engagement exactly; an int makes items with more
    engagers hubs, which are no longer mirrored or counted (co-engagement becomes a lower bound)."""

    def __init__(self, partition: int, partitions: int, store: RowStore, partition_of: Callable[[int], int],
                 max_item_fanout: int | None = None, max_cached_rows: int = 2_000_000,
                 clock: ChangeClock = CHANGE_CLOCK) -> None:
        if max_item_fanout is not None and max_item_fanout < 0:
            raise ValueError(f"max_item_fanout must be None or >= 0, got {max_item_fanout}")
        self.partition = partition
        self.partitions = partitions
        self.store = store
        self.partition_of = partition_of
        self.max_item_fanout = max_item_fanout
        self.max_cached_rows = max_cached_rows
        self.stats = BehaviourStats()
        self._stamps: dict[bytes, dict[int, dict[int, set[int]]]] = {kind: {} for kind in _STAMP_KINDS}
        self._engaged: dict[int, dict[int, int]] = {}
        self._items: dict[bytes, dict[int, ItemEngagers]] = {ITEM: {}, ITEM_MIRROR: {}}
        self._dirty: set[tuple[bytes, int]] = set()
        self._changed: set[int] = set()  # local users changed since the refresher's last take (see graph.py)
        self._outbox = _Outbox()
        # change stamps for the kept lists (views_stamp, co_engagement_stamp), in memory: the latest change of a
        # local user's views either way, and of an item's engagers (or an engager's own item set). A stamp taken at
        # opening is the floor, so a partition opened again never answers a stamp a kept list saw before.
        self.clock = clock
        self._opened_stamp = clock.tick()
        self._view_stamp: dict[int, int] = {}
        self._item_stamp: dict[int, int] = {}

    # ---- row access (write-back cache over the store) -------------------------------------------------
    def _stamp_row(self, kind: bytes, user: int) -> dict[int, set[int]]:
        cache = self._stamps[kind]
        row = cache.get(user)
        if row is None:
            raw = self.store.get(row_key(kind, user))
            row = _decode_stamps(raw) if raw is not None else {}
            cache[user] = row
        return row

    def _engaged_row(self, user: int) -> dict[int, int]:
        row = self._engaged.get(user)
        if row is None:
            raw = self.store.get(row_key(ENGAGEMENTS, user))
            row = _decode_pairs(raw) if raw is not None else {}
            self._engaged[user] = row
        return row

    def has_user(self, user: int) -> bool:
        """Whether some event gave the local ``user`` behaviour state (views either way, dismissals, engagements).
        Reads without caching (see PartitionGraph.has_user)."""
        for kind in _STAMP_KINDS:
            row = self._stamps[kind].get(user)
            known = bool(row) if row is not None else self.store.get(row_key(kind, user)) is not None
            if known:
                return True
        row = self._engaged.get(user)
        return bool(row) if row is not None else self.store.get(row_key(ENGAGEMENTS, user)) is not None

    def _item_row(self, kind: bytes, item: int) -> ItemEngagers:
        cache = self._items[kind]
        row = cache.get(item)
        if row is None:
            raw = self.store.get(row_key(kind, item))
            row = ItemEngagers.decode(raw) if raw is not None else ItemEngagers()
            cache[item] = row
        return row

    def item_row(self, item: int) -> ItemEngagers:
        """The engagers of ``item`` as this partition knows them (its own copy, for an item of this partition)."""
        return self._item_row(ITEM if self.partition_of(item) == self.partition else ITEM_MIRROR, item)

    def _add_stamp(self, kind: bytes, user: int, other: int, ts: int) -> bool:
        row = self._stamp_row(kind, user)
        stamps = row.get(other)
        if stamps is None:
            row[other] = stamps = set()
        elif ts in stamps:
            self.stats.duplicates += 1
            return False
        stamps.add(ts)
        self._dirty.add((kind, user))
        self._changed.add(user)
        if kind != DISMISSALS:
            self._view_stamp[user] = self.clock.tick()
        return True

    def _require_local(self, user: int, what: str) -> None:
        # Events are keyed by their first user: one elsewhere means the caller routed it wrongly.
        if self.partition_of(user) != self.partition:
            raise ValueError(f"{what} {user} belongs to partition {self.partition_of(user)}, "
                             f"not {self.partition}")

    # ---- applying events and messages ------------------------------------------------------------------
    def apply_event(self, event: ProfileViewEvent | DismissalEvent | EngagementEvent) -> bool:
        """Apply a behaviour event of a local user; True when the state changed."""
        if isinstance(event, ProfileViewEvent):
            return self.apply_view(event.viewer, event.viewed, event.ts)
        if isinstance(event, DismissalEvent):
            return self.apply_dismissal(event.user, event.candidate, event.ts)
        return self.apply_engagement(event.user, event.item, event.ts)

    def apply_view(self, viewer: int, viewed: int, ts: int) -> bool:
        self._require_local(viewer, "viewer")
        if not self._add_stamp(VIEWS_OUT, viewer, viewed, ts):
            return False  # nothing new, nothing to send (the first time sent it already)
        self.stats.views += 1
        self._route(viewed, InboundView(viewed, viewer, ts))
        return True

    def apply_inbound_view(self, viewed: int, viewer: int, ts: int) -> bool:
        self._require_local(viewed, "viewed user")
        if not self._add_stamp(VIEWS_IN, viewed, viewer, ts):
            return False
        self.stats.inbound_views += 1
        return True

    def apply_dismissal(self, user: int, candidate: int, ts: int) -> bool:
        self._require_local(user, "user")
        if not self._add_stamp(DISMISSALS, user, candidate, ts):
            return False
        self.stats.dismissals += 1
        return True

    def apply_engagement(self, user: int, item: int, ts: int) -> bool:
        self._require_local(user, "user")
        row = self._engaged_row(user)
        old = row.get(item)
        if old is not None and old <= ts:
            self.stats.duplicates += 1
            return False  # add-only: a later engagement with the same item changes nothing
        row[item] = ts
        self._dirty.add((ENGAGEMENTS, user))
        self._changed.add(user)
        self._item_stamp[item] = self.clock.tick()  # the user's own co-engagements may move
        self.stats.engagements += 1
        if not self.item_row(item).hub:  # a known hub drops engagers: don't send them
            self._route(item, ItemEngagement(item, user, ts))
        return True

    def apply_message(self, message: BehaviourMessage) -> bool:
        if isinstance(message, InboundView):
            return self.apply_inbound_view(message.viewed, message.viewer, message.ts)
        if isinstance(message, ItemEngagement):
            return self.apply_item_engagement(message.item, message.user, message.ts)
        return self.apply_item_mirror(message.item, message.engagers, message.hub)

    def apply_item_engagement(self, item: int, user: int, ts: int) -> bool:
        """At the item's partition: merge an engager into the item's set and tell the mirrors."""
        self._require_local(item, "item")
        row = self._item_row(ITEM, item)
        if row.hub:
            # Hubs are terminal: nothing is kept or mirrored any more. Tell the sender's partition, so it
            # knows (and stops sending engagements of this item); a repeated marker changes nothing.
            if self.partition_of(user) != self.partition:
                self._send(self.partition_of(user), ItemMirrorUpdate(item, (), hub=True))
            self.stats.duplicates += 1
            return False
        partition_of = self.partition_of
        before = {partition_of(u) for u in row.engagers}
        if not row.merge(user, ts):
            self.stats.duplicates += 1
            return False
        self.stats.item_changes += 1
        self._dirty.add((ITEM, item))
        self._item_stamp[item] = self.clock.tick()  # its engagers' co-engagements move
        targets = (before | {partition_of(user)}) - {self.partition}
        if self.max_item_fanout is not None and len(row.engagers) > self.max_item_fanout:
            row.make_hub()
            self.stats.hub_items += 1
            for target in targets:  # every partition that mirrors the item, and the new engager's
                self._send(target, ItemMirrorUpdate(item, (), hub=True))
            return True
        for target in targets:
            if target in before:
                self._send(target, ItemMirrorUpdate(item, ((user, ts),)))
            else:  # that partition holds no copy yet: send every engager
                self._send(target, ItemMirrorUpdate(item, tuple(row.engagers.items())))
        return True

    def apply_item_mirror(self, item: int, engagers: Iterable[tuple[int, int]], hub: bool = False) -> bool:
        if self.partition_of(item) == self.partition:
            return False  # the owner's own set is the authority here
        row = self._item_row(ITEM_MIRROR, item)
        if hub:
            changed = row.make_hub()
        else:
            changed = False
            for user, ts in engagers:
                changed = row.merge(user, ts) or changed
        if changed:
            self.stats.mirror_changes += 1
            self._dirty.add((ITEM_MIRROR, item))
            self._item_stamp[item] = self.clock.tick()
        else:
            self.stats.duplicates += 1
        return changed

    def _route(self, key: int, message: BehaviourMessage) -> None:
        target = self.partition_of(key)
        if target == self.partition:
            self.apply_message(message)
        else:
            self._send(target, message)

    def _send(self, partition: int, message: BehaviourMessage) -> None:
        self._outbox.partitions.setdefault(partition, []).append(message)
        self.stats.messages_out += 1

    # ---- commit -----------------------------------------------------------------------------------------
    def take_outbox(self) -> dict[int, list[BehaviourMessage]]:
        """Messages for other partitions (by destination partition) produced since the last call."""
        outbox, self._outbox = self._outbox, _Outbox()
        return outbox.partitions

    def dirty_rows(self) -> tuple[dict[bytes, bytes], list[bytes]]:
        """The puts and deletes that persist every change since the last :meth:`mark_clean`."""
        puts: dict[bytes, bytes] = {}
        deletes: list[bytes] = []
        for kind, key_id in self._dirty:
            key = row_key(kind, key_id)
            if kind in self._items:
                puts[key] = self._items[kind][key_id].encode()  # kept even when empty: the hub marker
                continue
            row: dict[int, set[int]] | dict[int, int]
            row = self._engaged[key_id] if kind == ENGAGEMENTS else self._stamps[kind][key_id]
            if not row:
                deletes.append(key)
            elif kind == ENGAGEMENTS:
                puts[key] = _encode_pairs(self._engaged[key_id])
            else:
                puts[key] = _encode_stamps(self._stamps[kind][key_id])
        return puts, deletes

    def take_changed_users(self) -> set[int]:
        """Local users whose views (either way), dismissals or engagements changed since the last take."""
        changed, self._changed = self._changed, set()
        return changed

    def mark_clean(self) -> None:
        """The dirty rows are durable; forget them, and drop the cache when it has grown past its bound."""
        self._dirty.clear()
        cached = (sum(len(c) for c in self._stamps.values()) + len(self._engaged)
                  + sum(len(c) for c in self._items.values()))
        if cached > self.max_cached_rows:
            self.drop_cache()

    def cached_rows(self) -> int:
        """How many rows are cached (a few ``len()``: cheap enough for every flush)."""
        return (sum(len(c) for c in self._stamps.values()) + len(self._engaged)
                + sum(len(c) for c in self._items.values()))

    def cached_bytes(self) -> int:
        """Approximate memory of the cached rows (:func:`pymk.features.storage.row_cache_bytes`)."""
        rows = self.cached_rows()
        entries = (sum(len(row) + sum(map(len, row.values())) for c in self._stamps.values() for row in c.values())
                   + sum(map(len, self._engaged.values()))
                   + sum(len(row.engagers) for c in self._items.values() for row in c.values()))
        return row_cache_bytes(rows, entries)

    def drop_cache(self) -> None:
        """Forget every cached row (only when none is dirty: they are all in the store)."""
        self.evict_oldest(1.0)

    def evict_oldest(self, fraction: float) -> None:
        """Forget the oldest-loaded ``fraction`` of each cache (only when no row is dirty)."""
        assert not self._dirty, "evicting dirty rows would lose them"
        for cache in (*self._stamps.values(), self._engaged, *self._items.values()):
            evict_oldest_rows(cache, fraction)

    def flush(self) -> int:
        """Write every dirty row in one atomic batch (for callers with nothing else to commit)."""
        puts, deletes = self.dirty_rows()
        self.store.write(puts, deletes)
        self.mark_clean()
        return len(puts) + len(deletes)

    # ---- reads: profile views --------------------------------------------------------------------------------
    def _stamps_of(self, kind: bytes, user: int, other: int) -> set[int] | frozenset[int]:
        return self._stamp_row(kind, user).get(other, _EMPTY_STAMPS)

    def query_viewed_candidate_profile(self, user: int, candidate: int) -> tuple[int, int | None]:
        """(distinct views user → candidate, ts of the latest)."""
        stamps = self._stamps_of(VIEWS_OUT, user, candidate)
        return len(stamps), max(stamps, default=None)

    def candidate_viewed_query_profile(self, user: int, candidate: int) -> tuple[int, int | None]:
        """(distinct views candidate → user, ts of the latest), from the user's inbound views."""
        stamps = self._stamps_of(VIEWS_IN, user, candidate)
        return len(stamps), max(stamps, default=None)

    def mutual_profile_views(self, user: int, candidate: int) -> tuple[int, int | None]:
        """(min of the two view counts, ts at which that minimum reached its value): views reciprocated."""
        out = sorted(self._stamps_of(VIEWS_OUT, user, candidate))
        back = sorted(self._stamps_of(VIEWS_IN, user, candidate))
        k = min(len(out), len(back))
        if k == 0:
            return 0, None
        # min(|out ≤ t|, |back ≤ t|) grows with t and first reaches k when both sides have k views.
        return k, max(out[k - 1], back[k - 1])

    def last_view_between(self, user: int, candidate: int) -> int | None:
        """The ts of the latest view between the two, in either direction."""
        return max(chain(self._stamps_of(VIEWS_OUT, user, candidate), self._stamps_of(VIEWS_IN, user, candidate)),
                   default=None)

    def profile_view_recency_days(self, user: int, candidate: int, as_of_ms: int) -> tuple[float | None, int | None]:
        """(days from the latest view between the two, either direction, to ``as_of_ms``, that view's ts);
        (None, None) when they never viewed each other. A view after ``as_of_ms`` (clock skew) counts as 0."""
        latest = self.last_view_between(user, candidate)
        if latest is None:
            return None, None
        return max(0, as_of_ms - latest) / DAY_MS, latest

    def profile_view_counts(self, user: int) -> dict[int, tuple[int, int]]:
        """Every user with a view either way → (views user → them, views them → user), for scoring many."""
        out, back = self._stamp_row(VIEWS_OUT, user), self._stamp_row(VIEWS_IN, user)
        return {v: (len(out.get(v, ())), len(back.get(v, ()))) for v in out.keys() | back.keys()}

    # ---- reads: dismissals ---------------------------------------------------------------------------------
    def _kept_dismissals(self, user: int, candidate: int, since_ms: int | None) -> list[int]:
        stamps = self._stamps_of(DISMISSALS, user, candidate)
        return [t for t in stamps if since_ms is None or t >= since_ms]

    def dismissed(self, user: int, candidate: int, since_ms: int | None = None) -> tuple[bool, int | None]:
        """(whether user dismissed candidate, ts of the latest dismissal); dismissals before ``since_ms``
        (the expiry) are ignored, as if they never happened."""
        kept = self._kept_dismissals(user, candidate, since_ms)
        return bool(kept), max(kept, default=None)

    def dismissal_count(self, user: int, candidate: int, since_ms: int | None = None) -> int:
        """Distinct dismissals of candidate by user (since ``since_ms``)."""
        return len(self._kept_dismissals(user, candidate, since_ms))

    def dismissed_candidates(self, user: int, since_ms: int | None = None) -> set[int]:
        """Every candidate the user dismissed (at or after ``since_ms`` when given)."""
        row = self._stamp_row(DISMISSALS, user)
        if since_ms is None:
            return {v for v, stamps in row.items() if stamps}
        return {v for v, stamps in row.items() if any(t >= since_ms for t in stamps)}

    # ---- reads: engagement -----------------------------------------------------------------------------------
    def engaged_items(self, user: int) -> dict[int, int]:
        """A local user's items → the ts of the first engagement."""
        return dict(self._engaged_row(user))

    def is_hub_item(self, item: int) -> bool:
        return self.item_row(item).hub

    def co_engaged_with_content(self, user: int, candidate: int) -> tuple[int, int | None]:
        """(distinct non-hub items both engaged with, the largest max(first ts of each) over them)."""
        count, last = 0, None
        for item, ts in self._engaged_row(user).items():
            row = self.item_row(item)
            other = row.engagers.get(candidate)  # a hub has no engagers
            if other is not None and candidate != user:
                count += 1
                both = max(ts, other)
                last = both if last is None or both > last else last
        return count, last

    def views_stamp(self, user: int) -> int:
        """The stamp of the latest change of the local ``user``'s views either way (:meth:`profile_view_counts`,
        :meth:`last_view_between`); the opening's when none since."""
        return max(self._view_stamp.get(user, 0), self._opened_stamp)

    def co_engagement_stamp(self, user: int) -> int:
        """The stamp of the latest change that can move :meth:`co_engaged_counts` of ``user``: of one of its items'
        engagers (a mirror included), or of its own items; the opening's when none since."""
        stamp_of = self._item_stamp.get
        return max(max(map(stamp_of, self._engaged_row(user), repeat(0)), default=0), self._opened_stamp)

    def item_engagers(self, item: int) -> Collection[int]:
        """The engagers of ``item`` that :meth:`co_engaged_counts` counts (none for a hub)."""
        return self.item_row(item).engagers.keys()

    def item_stamp(self, item: int) -> int:
        """The stamp of the latest change of the item's engagers; the opening's when none since."""
        return max(self._item_stamp.get(item, 0), self._opened_stamp)

    def co_engaged_counts(self, user: int) -> dict[int, int]:
        """Every other user sharing an item with ``user`` → the number of shared (non-hub) items."""
        # Counter counts an iterable in C (the same integers, keys in first-seen order as a loop would add them)
        counts = Counter(chain.from_iterable(self.item_row(item).engagers for item in self._engaged_row(user)))
        counts.pop(user, None)
        return counts

    # ---- all features of a pair --------------------------------------------------------------------------------
    def pair_features(self, user: int, candidate: int, as_of_ms: int,
                      dismissal_since_ms: int | None = None) -> dict[str, tuple[float | int | None, int | None]]:
        """Every behavioural feature of (user, candidate) → (value, ts of the event that last changed it)."""
        dismissed, dismissed_ts = self.dismissed(user, candidate, dismissal_since_ms)
        return {
            "query_viewed_candidate_profile": self.query_viewed_candidate_profile(user, candidate),
            "candidate_viewed_query_profile": self.candidate_viewed_query_profile(user, candidate),
            "mutual_profile_views": self.mutual_profile_views(user, candidate),
            "profile_view_recency_days": self.profile_view_recency_days(user, candidate, as_of_ms),
            "dismissed": (int(dismissed), dismissed_ts),
            "co_engaged_with_content": self.co_engaged_with_content(user, candidate),
        }
