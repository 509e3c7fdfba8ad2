"""Remote users' degree, activity and profile fetched from their owners (``PYMK_GLOBALS_MODE=reachable``).

Replicated (the default), every worker keeps every user's ``user-globals`` records: ~600 bytes a user on each
worker, 600 GB at 10⁹ users (docs/capacity.md). Reachable, a worker keeps only the remote users its lists and
embeddings have read — the candidates of its users (2-hop, ANN, popular) and the nodes GraphSAGE samples around
them — and the topic, still read in full, keeps those current; every other record is dropped as it is read. The
popular order comes from each partition's most active users, which its owner publishes to the same topic when
they change (streams/state.py ``popular_record_of``; merged by features/activity.py ``MergedTops``), instead of
every user's degree record. ``PYMK_GLOBALS_HELD_MAX_USERS``
bounds them: past it the users answered longest ago are dropped, and fetched again when read.

A read of a remote user not held yet answers "unknown" and counts a miss (:class:`~pymk.streams.globals.UserGlobals`);
the list or embedding that read it is not published (the refresher compares the miss count around it; a new user's
list waits with its embedding) and the user is asked of the owners before the next slice — ``POST /facts`` to every
peer, each answering for the users of its partitions with the records it would publish for them now
(:func:`facts_answer`), merged by version like the topic's. The sharded ANN's hits are asked right after their
gather, before the lists that read them. An asked user's topic records are kept from the moment it is asked, so
none published while the answer travels is lost. An owner that does not answer in time (a dead peer, a partition
moving) leaves its users asked: the lists that read them wait, and the next slice asks again.

An answer dates a degree by the user's latest register (as the owner's own pages do), a topic record by the event
that changed it; ranking reads neither date.

With the ANN index sharded too (``PYMK_ANN_MODE=sharded``), the vectors are kept the same way
(streams/global_index.py): an answer also carries each answered user's embedding record as its owner holds it,
and an owner answers only for the users of partitions whose vectors it holds whole (one it is reading again after
a rebalance leaves its users asked).

Wire format: the request JSON (``{"users": [...]}``); the answer a 4-byte little-endian length, that many bytes of
JSON (``{"answered": [...], "records": [record, ...]}``: the records the ``user-globals`` topic's own,
streams/codec.py), then the embedding records, each a 4-byte length and the ``embeddings`` topic's bytes
(index/records.py): a vector crosses as its 512 bytes, not as text.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from pymk.features.graph import PartitionGraph
from pymk.index.records import EmbeddingRecord
from pymk.streams.codec import degree_record, profile_record
from pymk.streams.globals import UserGlobals
from pymk.streams.state import PartitionState

log = logging.getLogger(__name__)

FACTS_PATH = "/facts"
PostBytes = Callable[[str, bytes, float], Awaitable[bytes]]
StateFor = Callable[[int], PartitionState | None]  # user → its partition's state when this worker owns it


class HeldVectors(Protocol):
    """What an answer reads of the owner's vectors (:class:`~pymk.streams.global_index.GlobalIndex`)."""

    reachable: bool  # whether peers keep only the vectors they reach (then answers carry them)

    def answerable(self, user: int) -> bool: ...

    def record(self, user: int) -> EmbeddingRecord | None: ...

    def apply(self, record: EmbeddingRecord, partition: int | None = None) -> bool: ...


@dataclass(frozen=True)
class Answer:
    """An owner's answer: the users it answered for, their ``user-globals`` records and embedding records."""

    answered: list[int]
    records: list[bytes]
    embeddings: list[EmbeddingRecord]


# ---- wire ---------------------------------------------------------------------------------------------------------
def encode_request(users: Sequence[int]) -> bytes:
    return json.dumps({"users": list(users)}, separators=(",", ":")).encode()


def decode_request(body: bytes) -> list[int]:
    return [int(user) for user in json.loads(body)["users"]]


_LENGTH = struct.Struct("<I")


def encode_answer(answer: Answer) -> bytes:
    head = json.dumps({"answered": answer.answered, "records": [json.loads(r) for r in answer.records]},
                      separators=(",", ":")).encode()
    parts = [_LENGTH.pack(len(head)), head]
    for embedding in answer.embeddings:
        raw = embedding.encode()
        parts += [_LENGTH.pack(len(raw)), raw]
    return b"".join(parts)


def decode_answer(body: bytes) -> Answer:
    (length,) = _LENGTH.unpack_from(body)
    at = _LENGTH.size + length
    held = json.loads(body[_LENGTH.size : at])
    embeddings = []
    while at < len(body):
        (length,) = _LENGTH.unpack_from(body, at)
        at += _LENGTH.size
        embeddings.append(EmbeddingRecord.decode(body[at : at + length]))
        at += length
    return Answer([int(u) for u in held["answered"]], [json.dumps(r).encode() for r in held["records"]],
                  embeddings)


# ---- the owner's side -------------------------------------------------------------------------------------------
def facts_answer(users: Sequence[int], state_for: StateFor, vectors: HeldVectors | None = None) -> Answer:
    """The users of this worker's partitions among ``users``, and their ``user-globals`` records as the owner would
    publish them now: a degree record for a user with any connection register, a profile record for one with a
    profile. A user answered without records has neither (as nobody would have read one from the topic). With
    ``vectors`` keeping only what peers reach: each answered user's embedding record too (none: it has no vector),
    and the users of a partition whose vectors are not all here yet are not answered."""
    answered: list[int] = []
    records: list[bytes] = []
    embeddings: list[EmbeddingRecord] = []
    with_vectors = vectors is not None and vectors.reachable
    for user in users:
        state = state_for(user)
        if state is None:
            continue
        if with_vectors:
            assert vectors is not None
            if not vectors.answerable(user):
                continue
            embedding = vectors.record(user)
            if embedding is not None:
                embeddings.append(embedding)
        answered.append(user)
        if state.graph.has_user(user):  # (read without caching first: asked of a user no event named, none kept)
            row = state.graph.adjacency_row(user)
            _, last_ts = state.graph.degree_with_ts(user)
            records.append(degree_record(PartitionGraph.degree_update(user, row, last_ts or 0))[1])
        profile = state.profiles.profile(user)
        if profile is not None:
            records.append(profile_record(user, profile.to_dict(), state.profiles.field_timestamps(user))[1])
    return Answer(answered, records, embeddings)


# ---- the asking side ----------------------------------------------------------------------------------------------
@dataclass
class FetchStats:
    """``/stats`` ``remote_facts``."""

    fetches: int = 0  # rounds with something to ask
    users_asked: int = 0
    users_answered: int = 0
    records_merged: int = 0
    embeddings_merged: int = 0  # embedding records of an answer that changed a held vector
    peer_requests: int = 0
    peer_failures: int = 0  # requests that failed or timed out (their users are asked again)
    bytes_received: int = 0  # the peers' answers
    seconds: float = 0.0  # summed wall time of the rounds
    last_round_ms: float = 0.0


class RemoteFacts:
    """Asks the owners for the users :class:`UserGlobals` wants (``peers()``: the other workers' URLs; ``state_for``:
    this worker's own partitions, answered without a request; ``vectors``: the index, which keeps the answered
    users' vectors when it keeps only what it reaches)."""

    def __init__(self, user_globals: UserGlobals, state_for: StateFor, peers: Callable[[], Sequence[str]],
                 post: PostBytes, timeout_s: float, vectors: HeldVectors | None = None) -> None:
        self.globals = user_globals
        self.vectors = vectors
        self.state_for = state_for
        self.peers = peers
        self.post = post
        self.timeout_s = timeout_s
        self.stats = FetchStats()

    @property
    def misses(self) -> int:
        """Reads of a user not held (grows while a list or embedding reads one: it must not be published)."""
        return self.globals.misses

    def want(self, users: Iterable[int]) -> None:
        """Ask for these users at the next fetch: the remote ones not held (a local user is read from its state)."""
        self.globals.want(user for user in users if self.state_for(user) is None)

    async def _ask(self, url: str, body: bytes) -> Answer:
        self.stats.peer_requests += 1
        try:
            answer = await self.post(url + FACTS_PATH, body, self.timeout_s)
            self.stats.bytes_received += len(answer)
            return decode_answer(answer)
        except Exception as exc:  # noqa: BLE001 - a dead or slow peer: its users stay asked
            log.warning("facts of %s did not answer: %s", url, exc)
            self.stats.peer_failures += 1
            return Answer([], [], [])

    async def fetch(self) -> int:
        """Ask every owner for the wanted users at once and merge the answers; how many users were answered."""
        wanted = sorted(self.globals.wanted)
        if not wanted:
            return 0
        started = time.perf_counter()
        body = encode_request(wanted)
        # a user of a partition this worker has since taken
        answers = [facts_answer(wanted, self.state_for, self.vectors)]
        answers.extend(await asyncio.gather(*(self._ask(url, body) for url in self.peers())))
        # the owners' answers merged as one: under a bound each merge evicts the users answered longest ago but
        # never those it brings, and one merge per owner evicted what the other owners had just answered; the
        # users held first, then their vectors (the index keeps the vectors of held users only)
        users = [user for answer in answers for user in answer.answered]
        self.stats.records_merged += self.globals.merge_answer(users, [r for a in answers for r in a.records])
        if self.vectors is not None:
            for answer in answers:
                for embedding in answer.embeddings:
                    self.stats.embeddings_merged += self.vectors.apply(embedding)
        answered = len(users)
        seconds = time.perf_counter() - started
        self.stats.fetches += 1
        self.stats.users_asked += len(wanted)
        self.stats.users_answered += answered
        self.stats.seconds += seconds
        self.stats.last_round_ms = round(1000 * seconds, 3)
        return answered

    def describe(self) -> dict[str, Any]:
        return {**asdict(self.stats), **self.globals.describe_held()}
