"""How far a worker's state is behind its input, and the re-reads that bring it back.

The state keeps, per partition, the next offset it will apply of each topic it reads (inputs, partition
messages, commands); the consumer knows each topic-partition's end and how far it has read. What is behind is
the difference, read at every flush and by the debug API, with no broker round trip. A message ahead of the
state (the group's offset is past what a partition that moved here without its state has applied) starts a
re-read from the state's offset; a re-read that stalls is started again.

This is the only module that reads faust's consumer internals (``_read_offset``, ``_paused_partitions``,
``_buffered_partitions``: faust has no public reader for them), so a faust upgrade touches it alone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from faust.types import TP

from pymk.streams.state import PartitionState, WorkerState

log = logging.getLogger(__name__)


class InputProgress:
    STALL_S = 3.0  # a partition behind that long without progress, all it knows of read, is re-read

    def __init__(self, app: Any, state: WorkerState, topics: Sequence[str]) -> None:
        self.app = app  # the faust app (its consumer exists once the worker runs)
        self.state = state
        # commands too: a partition that moved here re-reads them like the rest, and that re-read can stall the
        # same way (the rank command of `pymk refresh` was then never applied by the worker the partition moved to)
        self.topics = list(topics)
        self.seeking: set[Any] = set()  # topic-partitions being re-read
        self._stalled: dict[Any, tuple[int, float]] = {}  # tp → (state's next offset, since when)

    # ---- how far behind ----------------------------------------------------------------------------------------
    def by_tp(self) -> dict[Any, tuple[int, int | None]]:
        """(messages not applied, last known end offset) per topic-partition of this worker's state; (1, None)
        for one not fetched yet."""
        consumer = self.app.consumer
        out: dict[Any, tuple[int, int | None]] = {}
        for partition, state in self.state.owned.items():
            for topic in self.topics:
                tp = TP(topic, partition)
                try:
                    end = consumer.highwater(tp)
                except Exception:  # noqa: BLE001 - not assigned to the consumer (yet): nothing known
                    end = None
                # Not fetched yet (just assigned): whether the state is behind is not known, so it counts as
                # behind by one: counted as caught up, a worker just given a partition without its state says it
                # owes nothing before its first fetch, and `wait-idle` returns before the re-read has started.
                out[tp] = (max(0, end - state.next_offset(topic)), end) if end is not None else (1, None)
        return out

    def backlog(self) -> int:
        """Messages of this worker's partitions (inputs, partition messages, commands) not applied yet."""
        return sum(behind for behind, _ in self.by_tp().values())

    def partition_behind(self, partition: int) -> bool:
        """Whether this worker's state of ``partition`` has not applied all its input yet (a partition that moved
        here without its state re-reads it: a user unknown now may be known in a moment)."""
        return any(behind for tp, (behind, _) in self.by_tp().items() if tp.partition == partition)

    def describe(self) -> list[dict[str, Any]]:
        """For /stats: every topic-partition this worker is behind on, with what its consumer knows of it (a
        partition that does not catch up shows why: paused, buffer full, read offset past the state)."""
        consumer = self.app.consumer
        out = []
        for tp, (behind, end) in sorted(self.by_tp().items()):
            if not behind:
                continue
            state = self.state.state_for(tp.partition)
            out.append({"topic": tp.topic, "partition": tp.partition, "behind": behind, "end": end,
                        "next_to_apply": state.next_offset(tp.topic) if state is not None else None,
                        "read_offset": consumer._read_offset.get(tp),
                        "paused": tp in consumer._paused_partitions,
                        "buffer_full": tp in consumer._buffered_partitions,
                        "re_reading": tp in self.seeking})
        return out

    # ---- re-reads ------------------------------------------------------------------------------------------------
    async def admit(self, stream: Any, event: Any) -> PartitionState | None:
        """The partition state for a message, or None when it must be skipped (already applied, not ours,
        or ahead of what this worker's state has applied: then re-read from there)."""
        message = event.message
        state = self.state.state_for(message.partition)
        if state is None:
            await stream.ack(event)
            return None
        expected = state.next_offset(message.topic)
        if message.offset < expected:
            await stream.ack(event)
            return None
        if message.offset > expected:
            if message.tp not in self.seeking:
                log.warning("%s: local state has applied up to offset %d, the group is at %d: re-reading",
                            message.tp, expected - 1, message.offset)
                self.seeking.add(message.tp)
                await self.app.consumer.seek(message.tp, expected)
            await stream.ack(event)
            return None
        self.seeking.discard(message.tp)
        return state

    async def reseek_stalled(self) -> None:
        """Start (or restart) the re-read of a partition whose state is behind while its consumer will not deliver
        what is missing: faust delivers only messages past its read offset of a partition. After a partition
        moved here without its state, that offset is the group's committed one, so a topic-partition that gets
        no new message (dismissals, say) never triggers the re-read in :meth:`admit`; and the rest of a batch
        fetched before a seek moves the read offset past the seek's target, so the re-read messages are
        dropped. A partition is stalled when its consumer has read everything it knows of (read offset at the
        end) while the state has applied none of the rest for ``STALL_S``; a busy worker makes progress or has
        not read to the end, so it is left alone."""
        consumer, now = self.app.consumer, time.monotonic()
        behind = self.by_tp()
        for tp in list(self._stalled):
            if not behind.get(tp, (0, 0))[0]:
                del self._stalled[tp]
        for tp, (missing, end) in behind.items():
            state = self.state.state_for(tp.partition)
            if not missing or state is None or end is None:  # end unknown: not fetched yet, nothing to re-read
                continue
            target = state.next_offset(tp.topic)
            read = consumer._read_offset.get(tp)
            if read is None or read < end - 1:
                self._stalled.pop(tp, None)  # messages still to be delivered: not stalled
                continue
            seen_target, since = self._stalled.setdefault(tp, (target, now))
            if seen_target != target:
                self._stalled[tp] = (target, now)  # progress
            elif now - since >= self.STALL_S:
                log.warning("%s: the state has applied up to offset %d, the consumer has read up to %d: "
                            "re-reading", tp, target - 1, read)
                self.seeking.add(tp)
                self._stalled[tp] = (target, now)
                await consumer.seek(tp, target)
