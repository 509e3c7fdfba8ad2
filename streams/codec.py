"""Wire format of the worker's internal topics.

``partition-messages``: one Kafka message carries many :mod:`pymk.features.graph` messages from one source
partition to one destination partition (the Kafka partition *is* the destination), as compact JSON:
``{"from": p, "m": [["E", owner, other, version], ["M", node, [n1, v1, n2, v2, …]], …]}`` (graph), plus
``["V", viewed, viewer, ts]``, ``["I", item, user, ts]``, ``["J", item, [u1, ts1, …], hub]`` (behaviour).

``user-globals`` (compacted, keyed by user): the latest degree of each user with its version, read by every
worker in full.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

from pymk.features.behaviour import BehaviourMessage, InboundView, ItemEngagement, ItemMirrorUpdate
from pymk.features.graph import DegreeUpdate, EdgeHalf, MirrorUpdate, PartitionMessage

Message = PartitionMessage | BehaviourMessage

# Kafka's default max.message.bytes is ~1 MB; stay well below it.
MAX_BATCH_ITEMS = 20_000


def _encode_message(message: Message) -> list[Any]:
    if isinstance(message, EdgeHalf):
        return ["E", message.owner, message.other, message.version]
    if isinstance(message, MirrorUpdate):
        return ["M", message.node, [x for pair in message.registers for x in pair]]
    if isinstance(message, InboundView):
        return ["V", message.viewed, message.viewer, message.ts]
    if isinstance(message, ItemEngagement):
        return ["I", message.item, message.user, message.ts]
    return ["J", message.item, [x for pair in message.engagers for x in pair], message.hub]


def _weight(encoded: list[Any]) -> int:
    return max(1, len(encoded[2]) // 2) if encoded[0] in ("M", "J") else 1


def encode_partition_batches(source: int, messages: Sequence[Message]) -> Iterator[bytes]:
    """Split into Kafka messages of at most ``MAX_BATCH_ITEMS`` register entries each."""
    chunk: list[list] = []
    size = 0
    for message in messages:
        encoded = _encode_message(message)
        weight = _weight(encoded)
        if chunk and size + weight > MAX_BATCH_ITEMS:
            yield json.dumps({"from": source, "m": chunk}, separators=(",", ":")).encode()
            chunk, size = [], 0
        chunk.append(encoded)
        size += weight
    if chunk:
        yield json.dumps({"from": source, "m": chunk}, separators=(",", ":")).encode()


def decode_partition_batch(raw: bytes) -> list[Message]:
    data = json.loads(raw)
    out: list[Message] = []
    for item in data["m"]:
        tag = item[0]
        if tag == "E":
            out.append(EdgeHalf(item[1], item[2], item[3]))
        elif tag == "M":
            out.append(MirrorUpdate(item[1], _pairs(item[2])))
        elif tag == "V":
            out.append(InboundView(item[1], item[2], item[3]))
        elif tag == "I":
            out.append(ItemEngagement(item[1], item[2], item[3]))
        elif tag == "J":
            out.append(ItemMirrorUpdate(item[1], _pairs(item[2]), bool(item[3])))
        else:
            raise ValueError(f"unknown partition message tag {tag!r}")
    return out


def _pairs(flat: list[int]) -> tuple[tuple[int, int], ...]:
    return tuple(zip(flat[0::2], flat[1::2], strict=True))


def degree_record(update: DegreeUpdate) -> tuple[bytes, bytes]:
    """(key, value) of a user's degree in the user-globals topic."""
    value = {"kind": "degree", "user": update.user, "degree": update.degree, "version": update.version,
             "ts": update.ts, "last_ts": update.last_ts, "activity": list(update.activity)}
    return f"d:{update.user}".encode(), json.dumps(value, separators=(",", ":")).encode()


def popular_record(partition: int, version: int, entries: list[tuple[int, float, int]],
                   complete: bool) -> tuple[bytes, bytes]:
    """(key, value) of a partition's most active users in the user-globals topic (``PYMK_GLOBALS_MODE=reachable``):
    (user, weekly-activity order key, degree) best first, and whether they are all of its users with activity."""
    value = {"kind": "popular", "partition": partition, "version": version, "complete": complete,
             "users": [list(entry) for entry in entries]}
    return f"t:{partition}".encode(), json.dumps(value, separators=(",", ":")).encode()


def profile_record(user: int, profile: dict[str, Any], field_ts: dict[str, int]) -> tuple[bytes, bytes]:
    """(key, value) of a user's whole current profile, with the ts of each field, in the user-globals topic.
    Its version, Σ (field ts + 1), grows with every field change (per-field ts only ever grow)."""
    value = {"kind": "profile", "user": user, "profile": profile, "field_ts": field_ts,
             "version": sum(ts + 1 for ts in field_ts.values())}
    return f"p:{user}".encode(), json.dumps(value, separators=(",", ":"), sort_keys=True).encode()
