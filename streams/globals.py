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
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from pymk.events import Profile
from pymk.features.activity import ActivityLeaderboard
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
        self.offsets: dict[int, int] = {}  # partition → next offset to read (shown by /stats: how far it has read)
        self.listeners: list[Callable[[int], None]] = []  # called with the user of every record that changed

    # ---- merging ----------------------------------------------------------------------------------------------
    def merge_record(self, raw: bytes) -> bool:
        data = json.loads(raw)
        user, version = int(data["user"]), int(data["version"])
        if data["kind"] == "degree":
            current = self._degrees.get(user)
            if current is not None and current[1] >= version:
                return False
            self._degrees[user] = (int(data["degree"]), version, int(data["ts"]))
            if "last_ts" in data:
                values, anchor = tuple(float(x) for x in data["activity"]), int(data["last_ts"])
                self._activity[user] = (values, anchor)
                self.leaderboard.update(user, values, anchor, int(data["degree"]))
        else:
            current_profile = self._profiles.get(user)
            if current_profile is not None and current_profile[2] >= version:
                return False
            self._profiles[user] = (profile_from_dict(data["profile"]), dict(data["field_ts"]), version)
        for listener in self.listeners:
            listener(user)
        return True

    # ---- reads ------------------------------------------------------------------------------------------------
    def degree(self, user: int) -> tuple[int, int | None]:
        """(degree, ts of its last change); (0, None) for a user never seen."""
        entry = self._degrees.get(user)
        return (entry[0], entry[2]) if entry is not None else (0, None)

    def activity(self, user: int) -> tuple[tuple[float, ...], int] | None:
        """(decayed connection activity at the anchor, anchor = last connection ts); None for a user never seen."""
        return self._activity.get(user)

    def most_active(self, k: int) -> list[int]:
        """The k users with the highest weekly connection activity, best first (ActivityLeaderboard order)."""
        return self.leaderboard.top(k)

    def profile(self, user: int) -> tuple[Profile | None, dict[str, int]]:
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
