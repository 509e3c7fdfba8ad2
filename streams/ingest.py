"""One input message, from raw bytes to state: validate, dead-letter what cannot be applied, apply the rest.

The agents of :mod:`pymk.streams.app` call :func:`ingest_message` under the state lock for every message of the
five input topics, so that this path, the one a hostile producer reaches, is testable without faust or a broker
(the fuzz test feeds it arbitrary keys and values). Nothing about one message can raise out of it: a failure of
pymk's own code is dead-lettered as ``internal_error`` (streams/errors.py) and the caller records the offset.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from pymk.events import (
    ConnectionEvent,
    DeadLetter,
    DismissalEvent,
    EngagementEvent,
    InputEvent,
    UserEvent,
    user_key,
)
from pymk.streams.state import PartitionState, WorkerState
from pymk.validation import Invalid, parse_event


class RawMessage(Protocol):
    """What is read of a Kafka message (faust's ``Message`` has these)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass(frozen=True)
class InputRules:
    max_message_bytes: int
    max_future_ms: int
    topic_of: Callable[[str], str]  # input kind → its topic (a misrouted event is forwarded there, keyed right)


def apply_event(state: PartitionState, event: InputEvent, raw: bytes, partition_of: Callable[[int], int],
                topic_of: Callable[[str], str]) -> None:
    """Apply a valid event to the partition's state."""
    state.event_time_ms = max(state.event_time_ms, event.ts)
    if isinstance(event, ConnectionEvent):
        # any partition may apply a connection: the halves owned elsewhere travel as messages
        state.graph.apply_connection(event.src, event.dst, event.action, event.ts)
    elif partition_of(event.key) != state.partition:
        # keyed by something else than its user: send it on, keyed right, to the partition that owns it
        state.forward.append((topic_of(event.KIND), user_key(event.key), raw))
    elif isinstance(event, UserEvent):
        if state.profiles.apply(event):
            state.changed_profiles.add(event.user)
    else:
        state.behaviour.apply_event(event)


def describe_event(event: InputEvent) -> tuple[tuple[int, ...], str, int, str]:
    """(users it names, topic kind, ts, a line for a person) of a valid event, for the debug page."""
    if isinstance(event, ConnectionEvent):
        return (event.src, event.dst), event.KIND, event.ts, f"{event.src} — {event.dst} {event.action}"
    if isinstance(event, UserEvent):
        fields = ", ".join(f"{name} {value}" for name, value in event.profile.to_dict().items())
        return (event.user,), event.KIND, event.ts, f"{event.user} profile: {fields or 'sign-up'}"
    if isinstance(event, EngagementEvent):
        return (event.user,), event.KIND, event.ts, f"{event.user} engaged with item {event.item}"
    if isinstance(event, DismissalEvent):
        return (event.user, event.candidate), event.KIND, event.ts, f"{event.user} dismissed {event.candidate}"
    return (event.viewer, event.viewed), event.KIND, event.ts, f"{event.viewer} viewed {event.viewed}'s profile"


def ingest_message(worker: WorkerState, state: PartitionState, kind: str, message: RawMessage, now_ms: int,
                   rules: InputRules) -> InputEvent | Invalid | None:
    """Validate and apply one message of the input topic ``kind``: the event applied, the :class:`Invalid` that
    was dead-lettered, or None when pymk's own code failed on it (dead-lettered as ``internal_error``). Never
    raises for anything about the message. The caller records its offset as applied either way."""
    try:
        result = parse_event(kind, message.value, now_ms, max_bytes=rules.max_message_bytes,
                             max_future_ms=rules.max_future_ms)
        if isinstance(result, Invalid):
            letter = DeadLetter.for_message(message.topic, message.partition, message.offset, result.reason,
                                            message.value, key=message.key, limit=rules.max_message_bytes)
            worker.dead_letters.append((letter.record_key, letter.to_json()))
        else:
            apply_event(state, result, message.value or b"", worker.partition_of, rules.topic_of)
            worker.note_event(*describe_event(result))
        return result
    except Exception as exc:  # noqa: BLE001 - one message must not stop the worker (streams/errors.py)
        message_failed(worker, "applying", exc, message, rules.max_message_bytes)
        return None


def message_failed(worker: WorkerState, stage: str, exc: Exception, message: RawMessage, limit: int) -> None:
    """A message whose processing failed: dead-lettered with reason internal_error; the caller records its offset
    as applied, so a restart does not fail on it again."""
    letter = worker.errors.message_letter(stage, exc, message.topic, message.partition, message.offset,
                                          message.value, message.key, limit)
    worker.dead_letters.append((letter.record_key, letter.to_json()))
