"""The change stamps of the worker's stores (:class:`pymk.ranking.source.ChangeStampSource`): one counter for the
whole process, moved forward by every change a kept list must notice (a user's facts, an embedding, a view, an
engagement), so stamps taken from different stores compare.

In memory only: a restart starts the counter again, and the kept lists, which hold stamps, are empty after a
restart too, so no stamp of before is ever compared with one of after.
"""

from __future__ import annotations

import threading


class ChangeClock:
    """A counter that only moves forward (thread-safe: the index may apply records off the ranking thread)."""

    def __init__(self) -> None:
        self._now = 0
        self._lock = threading.Lock()

    def tick(self) -> int:
        """A stamp larger than every stamp given or read before."""
        with self._lock:
            self._now += 1
            return self._now

    def now(self) -> int:
        """The latest stamp given (0 before the first)."""
        return self._now


CHANGE_CLOCK = ChangeClock()  # the process's; every store of the worker stamps with it
