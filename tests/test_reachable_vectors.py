"""Sharded ANN with reachable globals (PYMK_ANN_MODE=sharded, PYMK_GLOBALS_MODE=reachable): a worker keeps the
vectors of its partitions' users and of the remote users its user-globals hold, and no others
(streams/global_index.py); a remote user's vector comes with its facts (streams/remote_facts.py).

Tier 1 (the index's rules, the owner's answer, the asking side's merge with a stand-in post) and tier 3 (a
rebalance's partition read again from the real topic). The three workers' lists against one replicated worker
are in tests/test_sharded_ann_workers.py."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import replace
from pathlib import Path

import numpy as np

from pymk.index.records import EmbeddingRecord
from pymk.settings import Settings
from pymk.streams.global_index import GlobalIndex
from pymk.streams.globals import UserGlobals
from pymk.streams.partitioning import partition_for_user
from pymk.streams.remote_facts import Answer, RemoteFacts, decode_answer, encode_answer, facts_answer
from pymk.streams.topics import ensure_topics

PARTITIONS = 4
DIM = 128


def vector_of(user: int, version: int = 1) -> np.ndarray:
    vector = np.random.default_rng(1000 * user + version).standard_normal(DIM).astype(np.float32)
    return vector / np.linalg.norm(vector)


def record(user: int, version: int = 1) -> EmbeddingRecord:
    return EmbeddingRecord(user, version, 1_000 + version, "m", vector_of(user, version))


def partition(user: int) -> int:
    return partition_for_user(user, PARTITIONS)


def reachable(tmp_path: Path, name: str = "index") -> tuple[GlobalIndex, UserGlobals]:
    settings = Settings(home=tmp_path, partitions=PARTITIONS, ann_mode="sharded", globals_mode="reachable")
    index, held = GlobalIndex(settings, tmp_path / name), UserGlobals(settings)
    index.holds, index.on_miss = held.holds, held.missing  # as the worker wires them (streams/app.py)
    held.evict_listeners.append(index.forget)
    return index, held


def test_only_the_shards_and_the_held_users_vectors_are_kept_and_a_read_of_another_is_a_miss(tmp_path: Path) -> None:
    index, held = reachable(tmp_path)
    users = list(range(60))
    for user in users[:30]:  # before the first assignment everything read is kept
        index.apply(record(user), partition(user))
    index.assign({0, 1})
    mine = {u for u in users if partition(u) in {0, 1}}
    assert set(index.store.users().tolist()) == mine & set(users[:30])  # the others' dropped at the assignment
    assert index.complete == {0, 1} and index.graph_partitions == {0, 1}
    for user in users[30:]:
        index.apply(record(user), partition(user))
    assert set(index.store.users().tolist()) == mine
    assert index.records_dropped == len([u for u in users[30:] if u not in mine])
    remote = min(u for u in users if u not in mine)
    # a read of a remote user not held: no vector, a miss, and the user is asked for
    assert index.vector(remote) is None and held.misses == 1 and held.wanted == {remote}
    rows = index.vectors([min(mine), remote])
    assert np.array_equal(rows[0], vector_of(min(mine))) and np.isnan(rows[1]).all() and held.misses == 2
    # a shard user without a vector is no miss (its partition is held whole)
    assert index.vector(1_000_000 + next(p for p in range(10_000) if partition(1_000_000 + p) == 0)) is None
    assert held.misses == 2
    # asked: its records are kept from now on (a newer one from the topic, then the owner's older answer)
    index.apply(record(remote, 2), partition(remote))
    assert np.array_equal(index.vector(remote), vector_of(remote, 2))
    index.apply(record(remote, 1), partition(remote))
    assert np.array_equal(index.vector(remote), vector_of(remote, 2))
    # dropped from user-globals past their bound: its vector goes too
    index.forget([remote, min(mine)])
    assert remote not in index.store and min(mine) in index.store


def test_a_rebalance_drops_the_revoked_users_and_reads_a_new_partition_again(tmp_path: Path) -> None:
    index, held = reachable(tmp_path)
    users = list(range(80))
    for user in users:
        index.apply(record(user), partition(user))
    kept_remote = next(u for u in users if partition(u) == 2)
    held.want([kept_remote])  # held by user-globals: stays whatever the assignment
    index.assign({0, 1})
    index.assign({1, 2, 3})
    assert {partition(u) for u in index.store.users().tolist()} <= {1, 2}
    assert kept_remote in index.store and not any(partition(u) == 0 for u in index.store.users().tolist())
    # 2 and 3 were not kept whole: read again from the topic's start before the shard answers for them
    assert index._rewind == {2, 3} and index.complete == {1} and index.graph_partitions == {1}
    assert index.answerable(next(u for u in users if partition(u) == 1))
    assert not index.answerable(next(u for u in users if partition(u) == 3))
    # the snapshot says which partitions are whole; a restart resumes with them
    index.offsets = {p: 1 for p in range(PARTITIONS)}
    index.snapshot()
    again, _ = reachable(tmp_path)
    assert again.complete == {1} and set(again.store.users().tolist()) == set(index.store.users().tolist())
    # opened by a worker that keeps every vector: the partitions not kept whole are read from the start
    everything = GlobalIndex(Settings(home=tmp_path, partitions=PARTITIONS, ann_mode="sharded"), tmp_path / "index")
    assert everything.offsets == {1: 1} and not everything.reachable


def test_the_owner_answers_vectors_with_facts_and_the_asker_keeps_them(tmp_path: Path) -> None:
    owner_index, _ = reachable(tmp_path / "owner")
    asker_index, asker_globals = reachable(tmp_path / "asker")
    users = list(range(40))
    for user in users:
        owner_index.apply(record(user, 3), partition(user))
        asker_index.apply(record(user, 3), partition(user))
    owner_index.assign({0, 1})
    asker_index.assign({2, 3})
    theirs = sorted(u for u in users if partition(u) in {0, 1})
    no_vector = 5_000 + next(p for p in range(10_000) if partition(5_000 + p) == 0)
    owner_index.apply(EmbeddingRecord(theirs[0], 4, 9_000, "m", np.empty(0, np.float32)))  # deleted: none

    class OwnerState:  # stands for the partition state facts_answer reads
        class graph:  # noqa: N801
            @staticmethod
            def has_user(user: int) -> bool:
                return False

        class profiles:  # noqa: N801
            @staticmethod
            def profile(user: int) -> None:
                return None

    def owner_state_for(user: int) -> type[OwnerState] | None:
        return OwnerState if partition(user) in {0, 1} else None

    elsewhere = next(u for u in range(3_000_000, 3_010_000) if partition(u) == 2)
    answer = facts_answer([*theirs, no_vector, elsewhere], owner_state_for, owner_index)  # type: ignore[arg-type]
    assert answer.answered == [*theirs, no_vector] and answer.records == []
    assert [e.user for e in answer.embeddings] == theirs[1:]  # the deleted one and the one never embedded: none
    back = decode_answer(encode_answer(answer))
    assert isinstance(back, Answer) and back.answered == answer.answered and back.records == []
    for got, sent in zip(back.embeddings, answer.embeddings, strict=True):  # the topic's bytes, exactly
        assert got.encode() == sent.encode()

    assert not any(u in asker_index.store for u in theirs)
    misses = [u for u in theirs if asker_index.vector(u) is None]
    assert misses == theirs and asker_globals.wanted == set(theirs)

    async def post(url: str, body: bytes, timeout_s: float) -> bytes:
        from pymk.streams.remote_facts import decode_request

        return encode_answer(facts_answer(decode_request(body), owner_state_for, owner_index))  # type: ignore[arg-type]

    fetcher = RemoteFacts(asker_globals, lambda user: None, lambda: ["http://owner"], post, 1.0, asker_index)
    assert asyncio.run(fetcher.fetch()) == len(theirs)
    assert asker_index.vector(theirs[0]) is None  # deleted at its owner: answered without a vector
    for user in theirs[1:]:
        assert np.array_equal(asker_index.vector(user), vector_of(user, 3))
    assert fetcher.stats.embeddings_merged == len(theirs) - 1 and not asker_globals.wanted
    # a partition its owner is reading again is not answered: its users stay asked
    owner_index.complete.discard(0)
    again = facts_answer(theirs, owner_state_for, owner_index)  # type: ignore[arg-type]
    assert again.answered == [u for u in theirs if partition(u) == 1]


def test_a_newly_assigned_partition_is_read_again_from_the_topic(kafka_settings: Settings, tmp_path: Path) -> None:
    """Tier 3: the index's own consumer seeks a newly assigned partition back to its start and reads it whole
    before its shard answers for it."""
    settings = replace(kafka_settings, partitions=PARTITIONS, ann_mode="sharded", globals_mode="reachable")
    ensure_topics(settings)
    from kafka import KafkaProducer

    producer = KafkaProducer(**settings.kafka_client_config())
    users = list(range(120))
    for user in users:
        raw = record(user).encode()
        producer.send(settings.topic("embeddings"), key=str(user).encode(), value=raw, partition=partition(user))
    producer.flush()
    producer.close()

    async def scenario() -> tuple[set[int], set[int], set[int], int]:
        index = GlobalIndex(settings, tmp_path / "index")
        index.holds, index.on_miss = (lambda user: False), (lambda user: None)
        task = asyncio.get_running_loop().create_task(index.run())
        try:
            await asyncio.wait_for(index.caught_up.wait(), 60)
            index.assign({0})  # partition 0 whole (everything read before the assignment was kept)
            first = set(index.store.users().tolist())
            index.assign({1})  # 0 revoked; 1's records were dropped after the first assignment: read again
            for _ in range(240):
                if index.graph_partitions == {1}:
                    break
                await asyncio.sleep(0.25)
            return first, set(index.store.users().tolist()), set(index.index.users().tolist()), index.rewinds
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    first, store, graph, rewinds = asyncio.run(scenario())
    # before the first assignment every record was kept: partition 0 needed no second read
    assert first == {u for u in users if partition(u) == 0}
    assert store == graph == {u for u in users if partition(u) == 1} and rewinds == 1
