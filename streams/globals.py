"""Facts about every user that every worker needs: degree and profile, from the compacted ``user-globals``
topic read in full (like a faust GlobalTable, the topic is the changelog).

A candidate usually lives in another partition than the query user; its degree (for Jaccard and
``candidate_degree_log``) and profile (for the profile similarity features) come from here. Owners publish a
record whenever the value changes, with a version that grows with every change, so the newest wins whatever
the order of arrival (a replay after a crash re-sends older versions harmlessly).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from pymk.events import Profile
from pymk.features.activity import ActivityLeaderboard, MergedTops
from pymk.settings import Settings

log = logging.getLogger(__name__)


def profile_from_dict(data: dict[str, Any]) -> Profile:
    skills = data.get("skills")
    geo = data.get("geo")
    return Profile(company=data.get("company"), school=data.get("school"), industry=data.get("industry"),
                   title=data.get("title"), skills=tuple(skills) if skills is not None else None,
                   geo=(float(geo[0]), float(geo[1])) if geo is not None else None)


async def table_consumer(settings: Settings, topic: str) -> tuple[AIOKafkaConsumer, list[TopicPartition]]:
    """A started consumer outside any group, assigned every partition of a table topic read in full by every
    worker (``user-globals``, ``embeddings``). Partitions come from the settings: the topic was created by
    ensure_topics with the app's partition count, and aiokafka's metadata lookup may lag."""
    config = settings.aiokafka_client_config()
    consumer = AIOKafkaConsumer(bootstrap_servers=config.pop("bootstrap_servers"), enable_auto_commit=False,
                                auto_offset_reset="earliest", group_id=None, **config)
    await consumer.start()
    tps = [TopicPartition(topic, p) for p in range(settings.partitions)]
    consumer.assign(tps)
    return consumer, tps


class UserGlobals:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topic = settings.topic("user-globals")
        self._degrees: dict[int, tuple[int, int, int]] = {}  # user → (degree, version, ts)
        # user → (decayed connection activity at the anchor, anchor = ts of the last connection change)
        self._activity: dict[int, tuple[tuple[float, ...], int]] = {}
        self._profiles: dict[int, tuple[Profile, dict[str, int], int]] = {}  # user → (profile, field ts, version)
        self.leaderboard = ActivityLeaderboard()  # the most active users (Stage 1's "popular" source)
        # reachable: the same order from each partition's most active users, as their owners publish them
        self.tops = MergedTops()
        self.offsets: dict[int, int] = {}  # partition → next offset to read (shown by /stats: how far it has read)
        self.listeners: list[Callable[[int], None]] = []  # called with the user of every record that changed
        # reachable: called with the users dropped past the bound (the index drops their vectors too)
        self.evict_listeners: list[Callable[[list[int]], None]] = []
        # PYMK_GLOBALS_MODE=reachable (streams/remote_facts.py): the records kept are those of the held users, the
        # remote users read since the start, each fetched once from its owner; a read of any other is a miss
        self.reachable_only = settings.globals_mode == "reachable"
        self._held: set[int] = set()  # asked or answered: their topic records are kept
        # an owner's answer covered them: their reads are exact (in the order answered: the oldest go first)
        self._answered: dict[int, None] = {}
        self.held_max_users = settings.globals_held_max_users  # past it the oldest answered are dropped (0: never)
        self.evicted = 0
        self.wanted: set[int] = set()  # read, not answered yet: the next fetch asks for them
        self.misses = 0  # reads of a user not answered yet
        self.records_dropped = 0  # records of users not held, dropped as read

    # ---- merging ----------------------------------------------------------------------------------------------
    def merge_record(self, raw: bytes) -> bool:
        data = json.loads(raw)
        if data["kind"] == "popular":  # a partition's most active users (reachable: the popular order)
            return self.tops.put(int(data["partition"]), int(data["version"]),
                                 [(int(u), float(key), int(degree)) for u, key, degree in data["users"]],
                                 bool(data["complete"]))
        user, version = int(data["user"]), int(data["version"])
        if self.reachable_only and user not in self._held:
            self.records_dropped += 1
            return False
        if data["kind"] == "degree":
            current = self._degrees.get(user)
            if current is not None and current[1] >= version:
                return False
            self._degrees[user] = (int(data["degree"]), version, int(data["ts"]))
            if "last_ts" in data:
                values, anchor = tuple(float(x) for x in data["activity"]), int(data["last_ts"])
                self._activity[user] = (values, anchor)
                if not self.reachable_only:  # reachable: the popular order is the partitions' lists (self.tops)
                    self.leaderboard.update(user, values, anchor, int(data["degree"]), version)
        else:
            current_profile = self._profiles.get(user)
            if current_profile is not None and current_profile[2] >= version:
                return False
            self._profiles[user] = (profile_from_dict(data["profile"]), dict(data["field_ts"]), version)
        for listener in self.listeners:
            listener(user)
        return True

    def merge_answer(self, answered: Sequence[int], records: Sequence[bytes]) -> int:
        """An owner's answer (streams/remote_facts.py): its records merged by version, as the topic's are, and its
        users held and answered from now on; how many records changed something."""
        self._held.update(answered)
        merged = sum(self.merge_record(raw) for raw in records)
        new = [user for user in answered if user not in self._answered]
        self._answered.update(dict.fromkeys(new))
        self.wanted.difference_update(answered)
        for user in new:  # what was read of them before (unknowns) is read again, whatever merged
            for listener in self.listeners:
                listener(user)
        if self.held_max_users and len(self._answered) > self.held_max_users:
            self._evict(len(self._answered) - self.held_max_users, set(new))
        return merged

    def want(self, users: Iterable[int]) -> None:
        """Reachable: ask for these users at the next fetch unless held (the sharded ANN's hits, known before the
        lists that read them are ranked)."""
        if self.reachable_only:
            for user in users:
                self._ask(user)

    def _ask(self, user: int) -> None:
        """Keep the user's records from now on, and ask for it at the next fetch, unless already held."""
        if user not in self._held:
            self._held.add(user)
            self.wanted.add(user)

    def _evict(self, count: int, keep: set[int]) -> None:
        """Drop the ``count`` users answered longest ago (never those of the answer just merged: the lists about to
        be ranked read them); their next read is a miss, and a fetch."""
        gone = []
        for user in self._answered:
            if len(gone) == count:
                break
            if user not in keep:
                gone.append(user)
        for user in gone:
            del self._answered[user]
            self._held.discard(user)
            self._degrees.pop(user, None)
            self._activity.pop(user, None)
            self._profiles.pop(user, None)
            for listener in self.listeners:  # what was read of them is not kept current any more
                listener(user)
        self.evicted += len(gone)
        for evict_listener in self.evict_listeners:
            evict_listener(gone)

    def holds(self, user: int) -> bool:
        """Reachable: whether the user's records are kept here (asked or answered)."""
        return user in self._held

    def missing(self, user: int) -> bool:
        """A read of the user by another store (the index's vectors): :meth:`_missing`."""
        return self._missing(user)

    def _missing(self, user: int) -> bool:
        """Reachable: whether the user's facts are not here yet; if so it is asked for (and its records kept)."""
        if not self.reachable_only or user in self._answered:
            return False
        self.misses += 1
        self._ask(user)
        return True

    def describe_held(self) -> dict[str, Any]:
        return {"mode": "reachable" if self.reachable_only else "replicated", "held_users": len(self._held),
                "answered_users": len(self._answered), "wanted_users": len(self.wanted), "misses": self.misses,
                "records_dropped": self.records_dropped, "evicted_users": self.evicted,
                "records_kept": len(self._degrees) + len(self._profiles),
                "popular_order_users": len(self.tops) if self.reachable_only else len(self.leaderboard),
                "popular_answers_cut": self.tops.answers_cut}

    # ---- reads ------------------------------------------------------------------------------------------------
    def degree(self, user: int) -> tuple[int, int | None]:
        """(degree, ts of its last change); (0, None) for a user never seen (reachable: or not held yet)."""
        if self._missing(user):
            return 0, None
        entry = self._degrees.get(user)
        return (entry[0], entry[2]) if entry is not None else (0, None)

    def activity(self, user: int) -> tuple[tuple[float, ...], int] | None:
        """(decayed connection activity at the anchor, anchor = last connection ts); None for a user never seen."""
        if self._missing(user):
            return None
        return self._activity.get(user)

    def most_active(self, k: int) -> list[int]:
        """The k users with the highest weekly connection activity, best first (ActivityLeaderboard order);
        reachable: from the partitions' lists, which may answer fewer (MergedTops)."""
        return self.tops.top(k) if self.reachable_only else self.leaderboard.top(k)

    def profile(self, user: int) -> tuple[Profile | None, dict[str, int]]:
        if self._missing(user):
            return None, {}
        entry = self._profiles.get(user)
        return (entry[0], entry[1]) if entry is not None else (None, {})

    def __len__(self) -> int:
        return len(self._degrees.keys() | self._profiles.keys())

    async def run(self) -> None:
        """Read the topic from the beginning, then follow it, for the life of the worker."""
        consumer, tps = await table_consumer(self.settings, self.topic)
        try:
            await consumer.seek_to_beginning(*tps)
            while True:
                batches = await consumer.getmany(timeout_ms=500, max_records=10_000)
                for tp, records in batches.items():
                    for record in records:
                        if record.value is not None:
                            self.merge_record(record.value)
                        self.offsets[tp.partition] = record.offset + 1
        finally:
            await consumer.stop()
