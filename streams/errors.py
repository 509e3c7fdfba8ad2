"""The worker's one rule for failures of its own code: a failure while applying, embedding, ranking or publishing
for one message or one user never ends the process.

As Kafka Streams has its deserialization and production exception handlers, pymk has :class:`InternalErrors`:
the message (or the user) goes to the dead-letter topic with reason ``internal_error`` (the exception's type, its
text and a short trace), the user is skipped (its owed work is marked done: it is owed again at its next change),
a counter by stage rises (``pymk_internal_errors_total`` in ``/metrics``), and the log says it once per stage and
exception type with its trace; processing goes on.

What still ends a worker on purpose is not caught here: the broker unreachable past the producer's and consumer's
timeouts (then nothing can be made durable), a full disk or a RocksDB error on write (the state could not be
trusted): the process stops, and a restart re-reads from the last durable offsets.
"""

from __future__ import annotations

import logging
import traceback
from collections import Counter
from collections.abc import Callable

from pymk.events import DeadLetter

log = logging.getLogger(__name__)

TRACE_FRAMES = 4  # the innermost frames kept in a dead letter's reason


def describe_exception(exc: BaseException) -> str:
    """``Type: text | file:line in function < ...`` (innermost frames first), short enough for a reason."""
    frames = traceback.extract_tb(exc.__traceback__)[-TRACE_FRAMES:]
    where = " < ".join(f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno} in {frame.name}"
                       for frame in reversed(frames))
    text = str(exc)
    if len(text) > 300:
        text = text[:300] + "…"
    return f"{type(exc).__name__}: {text}" + (f" | {where}" if where else "")


class InternalErrors:
    """Counts failures by stage, logs the first of each (stage, exception type) with its trace, and makes the
    dead letters that report them."""

    def __init__(self, listener: Callable[[str], None] | None = None) -> None:
        self.by_stage: Counter[str] = Counter()
        self._logged: set[tuple[str, str]] = set()
        self.listener = listener  # called with the stage of every failure (the worker's metrics)

    def record(self, stage: str, exc: BaseException, what: str) -> str:
        """Count and log one failure; the dead letter's reason (``internal_error: ...``)."""
        self.by_stage[stage] += 1
        if self.listener is not None:
            self.listener(stage)
        reason = f"internal_error: {stage} {what}: {describe_exception(exc)}"
        signature = (stage, type(exc).__name__)
        if signature not in self._logged:
            self._logged.add(signature)
            log.error("internal error while %s %s (logged once per stage and exception type; counted in "
                      "pymk_internal_errors_total; dead-lettered, processing goes on)", stage, what, exc_info=exc)
        else:
            log.debug("internal error while %s %s: %s", stage, what, exc)
        return reason

    def message_letter(self, stage: str, exc: BaseException, topic: str, partition: int, offset: int,
                       raw: bytes | None, key: bytes | None, limit: int) -> DeadLetter:
        """The dead letter of an input message whose processing failed."""
        reason = self.record(stage, exc, f"{topic}[{partition}]@{offset}")
        return DeadLetter.for_message(topic, partition, offset, reason, raw, key=key, limit=limit)

    def user_letter(self, stage: str, exc: BaseException, topic: str, partition: int, user: int) -> DeadLetter:
        """The dead letter of a user whose embedding or list failed (no input message: offset -1)."""
        reason = self.record(stage, exc, f"user {user}")
        return DeadLetter.for_message(topic, partition, -1, reason, b"", key=str(user).encode(), user=user)
