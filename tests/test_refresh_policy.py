"""The refresh scheduling policy (streams/refresh.py) and the durable pending rows it reads (streams/work.py):
pure, no broker. Who is refreshed first under overload, and that nobody owed a list is dropped."""

from __future__ import annotations

import asyncio
import struct
import time
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pymk.events import Recommendations
from pymk.features.keyspace import PENDING
from pymk.features.storage import DictRowStore, row_key
from pymk.settings import Settings
from pymk.streams.refresh import EMBED_CHUNK, ListBudget, Refresher, RefreshStats, refresh_order
from pymk.streams.state import OutputTopics, WorkerState
from pymk.streams.work import NO_EMBEDDING_DUE, PendingWork

STALE_MS = 60_000


def commit(work: PendingWork, store: DictRowStore) -> None:
    puts, deletes = work.dirty_rows()
    store.write(puts, deletes)
    work.mark_clean()


def test_newest_first_then_stale_lane_oldest_first() -> None:
    now = 1_000_000
    owed = [
        (now - 5_000, now - 5_000, 1),  # deferred for 5 s
        (now - 500, now - 500, 2),  # touched in the previous flush
        (now - 9_000, now, 3),  # waiting 9 s, touched again now
        (now, now, 4),  # new now
        (now - STALE_MS - 1, now - STALE_MS - 1, 5),  # stale
        (now - STALE_MS, now - 100, 6),  # stale (exactly at the bound), although touched recently
    ]
    stale, fresh = refresh_order(owed, now, STALE_MS)
    assert stale == [5, 6]
    assert fresh == [3, 4, 2, 1]  # newest last touch first; a tie goes to the one waiting longer (3)


def test_ties_of_the_same_flush_do_not_always_favour_the_same_users() -> None:
    now = 5_000_000
    owed = [(now, now, user) for user in range(50)]
    firsts = {refresh_order(owed, now + shift, STALE_MS)[1][0] for shift in range(40)}
    assert len(firsts) > 10
    assert sorted(refresh_order(owed, now, STALE_MS)[1]) == list(range(50))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 200_000), st.integers(0, 200_000)), max_size=60),
       st.integers(0, 300_000))
def test_every_owed_user_is_in_exactly_one_lane(stamps: list[tuple[int, int]], now: int) -> None:
    owed = [(min(a, b), max(a, b), user) for user, (a, b) in enumerate(stamps)]
    stale, fresh = refresh_order(owed, now, STALE_MS)
    assert sorted(stale + fresh) == list(range(len(owed)))
    firsts = {user: first for first, _, user in owed}
    lasts = {user: last for _, last, user in owed}
    assert all(firsts[u] <= now - STALE_MS for u in stale) and all(firsts[u] > now - STALE_MS for u in fresh)
    assert [firsts[u] for u in stale] == sorted(firsts[u] for u in stale)
    assert [lasts[u] for u in fresh] == sorted((lasts[u] for u in fresh), reverse=True)


def reference_order(owed: list[tuple[int, int, int]], now_ms: int,
                    max_staleness_ms: int) -> tuple[list[int], list[int]]:
    """The lanes as refresh_order computed them with Python sorts (before refresh_lanes)."""
    cut = now_ms - max_staleness_ms
    stale = sorted((first, user) for first, _, user in owed if first <= cut)
    fresh = sorted((-last, first, ((user ^ now_ms) * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF, user)
                   for first, last, user in owed if first > cut)
    return [user for _, user in stale], [entry[3] for entry in fresh]


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.integers(-2**63, 2**63 - 1) | st.integers(0, 40),
                       st.tuples(st.sampled_from([0, 1, 500, STALE_MS - 1, STALE_MS, STALE_MS + 1])
                                 | st.integers(0, 10**6),
                                 st.sampled_from([0, 1, 100]) | st.integers(0, 10**6)), max_size=80),
       st.integers(STALE_MS, 2**45))
def test_the_numpy_lanes_equal_the_python_sorts(ages: dict[int, tuple[int, int]], now: int) -> None:
    owed = [(now - first_age, now - min(first_age, last_age), user) for user, (first_age, last_age) in ages.items()]
    assert refresh_order(owed, now, STALE_MS) == reference_order(owed, now, STALE_MS)
    work = PendingWork(DictRowStore())
    for first, last, user in owed:
        work.touch(user, first, None, True)
        work.touch(user, last, None, True)
    first, last, users = work.owed_arrays()
    assert sorted(zip(first.tolist(), last.tolist(), users.tolist(), strict=True)) == sorted(owed)


def test_pending_rows_remember_first_and_last_touch_durably() -> None:
    store = DictRowStore()
    work = PendingWork(store)
    work.touch(7, 100, None, True)
    work.touch(7, 200, None, True)
    work.touch(8, 150, 150, False)  # an embedding only: no list owed
    assert work.refreshes() == [(100, 200, 7)]
    commit(work, store)
    reopened = PendingWork(store)
    assert reopened.rows == work.rows
    reopened.refreshed(7)
    assert 7 not in reopened.rows
    reopened.touch(7, 900, None, True)  # a change after the list: the next list answers from 900 on
    assert reopened.refreshes() == [(900, 900, 7)]
    reopened.embedded(8)
    commit(reopened, store)
    assert set(PendingWork(store).rows) == {7}


def test_rows_of_the_previous_format_are_read() -> None:
    store = DictRowStore()
    store.data[row_key(PENDING, 3)] = struct.pack("<qbq", NO_EMBEDDING_DUE, 1, 1234)
    work = PendingWork(store)
    assert work.refreshes() == [(1234, 1234, 3)]


class FakePublished:
    def __init__(self) -> None:
        self.lists: list[object] = []

    def put(self, recommendations: object) -> None:
        self.lists.append(recommendations)


class FakeState:
    """What refresh_due touches of a PartitionState."""

    def __init__(self, partition: int = 0) -> None:
        self.partition = partition
        self.work = PendingWork(DictRowStore())
        self.published = FakePublished()


class CountingRefresher(Refresher):
    """The real scheduling with a stand-in for ranking (each list "costs" ``cost_s`` of the budget)."""

    def __init__(self, settings_: Settings, cost_s: float) -> None:
        self.settings = settings_
        self.stats = RefreshStats()
        self.facts = None
        self._partitions = {}
        self._embed_spent_s = 0.0
        self._waiting_for_facts: set[int] = set()
        self.list_budget = ListBudget(settings_)
        self.cost_s = cost_s
        self.ranked: list[int] = []

    def rank(self, state: Any, user: int, now_ms: int) -> Any:
        self.ranked.append(user)
        time.sleep(self.cost_s)
        return (user, now_ms), []


def owed_state(now: int) -> FakeState:
    state = FakeState()
    for user in range(10):
        state.work.touch(user, now - 1_000 * user, None, True)  # user 0 newest, 9 oldest
    state.work.touch(99, now - 2 * STALE_MS, None, True)  # stale
    return state


def test_one_list_at_least_per_flush_and_the_stale_lane_goes_first() -> None:
    now = 10_000_000
    state = owed_state(now)
    refresher = CountingRefresher(Settings(refresh_max_staleness_ms=STALE_MS), cost_s=0.0)
    refresher.refresh_due([state], now, budget_s=0.0)  # type: ignore[list-item]
    assert refresher.ranked == [99]
    refresher.refresh_due([state], now, budget_s=0.0)  # type: ignore[list-item]
    assert refresher.ranked == [99, 0]  # then the newest
    assert refresher.stats.backlog == 9 and refresher.stats.oldest_owed_ms == 9_000
    assert refresher.stats.refreshed_stale == 1


def test_deferred_lists_are_served_later_none_dropped() -> None:
    now = 10_000_000
    state = owed_state(now)
    refresher = CountingRefresher(Settings(refresh_max_staleness_ms=STALE_MS, refresh_stale_share=0.5),
                                  cost_s=0.02)
    flushes = 0
    while state.work.refreshes():
        refresher.refresh_due([state], now + flushes * 500, budget_s=0.05)  # type: ignore[list-item]
        flushes += 1
        assert flushes < 20
    assert sorted(refresher.ranked) == [*range(10), 99] and len(refresher.ranked) == 11
    assert refresher.ranked[0] == 99 and refresher.ranked[1:4] == [0, 1, 2]  # stale first, then newest first
    assert refresher.stats.backlog == 0 and refresher.stats.deferred > 0


def test_an_idle_flush_uses_the_idle_budget() -> None:
    now = 10_000_000
    state = owed_state(now)
    refresher = CountingRefresher(Settings(refresh_budget_ms=1, refresh_idle_budget_ms=10_000), cost_s=0.002)
    refresher.refresh_due([state], now, idle=True)  # type: ignore[list-item]
    assert len(refresher.ranked) == 11


class EmbeddingState(FakeState):
    """Users 0-99 known (embedded before), 100-104 new; every one has a degree."""

    def __init__(self, partition: int) -> None:
        super().__init__(partition)
        self.embeddings = {u: object() for u in range(100)}
        self.graph = self
        self.profiles = self

    def degree(self, user: int) -> int:
        return 1

    def profile(self, user: int) -> None:
        return None


class EmbedCounting(CountingRefresher):
    def __init__(self, settings_: Settings, cost_s: float) -> None:
        super().__init__(settings_, cost_s)
        self.embedded: list[list[int]] = []

    def _embed(self, state: Any, users: list[int], now_ms: int, salt: int) -> list[Any]:
        self.embedded.append(list(users))
        time.sleep(self.cost_s)
        for user in users:
            state.work.embedded(user)
            state.embeddings[user] = object()
        return [object()] * len(users)


def test_new_users_are_embedded_at_once_reembeddings_within_the_budget_longest_due_first() -> None:
    now = 50_000_000
    state = EmbeddingState(0)
    for user in range(100):
        state.work.touch(user, now, now - 10 * user, False)  # due since 10·user ms: 99 waits longest
    for user in range(100, 105):
        state.work.touch(user, now, now, False)
    refresher = EmbedCounting(Settings(), cost_s=0.0)
    refresher.models = type("M", (), {"embedding_model": "sage-test"})()
    refresher.embed_due([state], now, budget_s=0.0)  # type: ignore[list-item]
    assert refresher.embedded[0] == [100, 101, 102, 103, 104]  # new: whatever the budget
    assert refresher.embedded[1] == list(range(99, 99 - EMBED_CHUNK, -1))  # one chunk, longest due first
    assert refresher.stats.embed_deferred == 100 - EMBED_CHUNK
    flushes = 1
    while state.work.embeddings_due(now):
        refresher.embed_due([state], now, budget_s=0.0)  # type: ignore[list-item]
        flushes += 1
    assert flushes == -(-100 // EMBED_CHUNK) and refresher.stats.embed_deferred == 0
    assert sorted(u for batch in refresher.embedded for u in batch) == list(range(105))


def test_a_flush_behind_its_input_ranks_one_list_and_keeps_the_rest_owed() -> None:
    now = 10_000_000
    state = owed_state(now)
    refresher = CountingRefresher(Settings(refresh_catch_up_backlog=1000, refresh_budget_ms=10_000), cost_s=0.0)
    assert not refresher.observe_input_backlog(1000) and refresher.observe_input_backlog(1001)
    assert refresher.stats.catch_up_flushes == 1 and refresher.stats.input_backlog == 1001
    refresher.refresh_due([state], now, catching_up=True)  # type: ignore[list-item]
    assert refresher.ranked == [99] and refresher.stats.backlog == 10
    refresher.refresh_due([state], now)  # type: ignore[list-item]
    assert len(refresher.ranked) == 11  # caught up: the whole budget again


def test_list_budget_takes_the_time_the_input_leaves_and_gives_it_back_when_the_input_falls_behind() -> None:
    budget = ListBudget(Settings(refresh_budget_ms=200, refresh_budget_max_ms=1000, refresh_keeping_up_backlog=300))
    assert budget.seconds == 0.2
    grown = [budget.observe(100) for _ in range(6)]
    assert grown[:4] == pytest.approx([0.3, 0.45, 0.675, 1.0])  # +50 % per flush, capped at the maximum
    assert grown[-1] == 1.0
    assert budget.observe(301) == 0.5 and budget.observe(5000) == 0.25  # halves while behind ...
    assert budget.observe(5000) == 0.2 and budget.observe(5000) == 0.2  # ... down to the base budget
    assert budget.observe(300) == pytest.approx(0.3)  # at the threshold the input still keeps up


def test_the_embedding_pass_before_ranking_between_flushes_embeds_new_users_only() -> None:
    """Ranking between flushes embeds new users first (their first list has ANN candidates) and leaves the
    re-embeddings due to the flush's budget."""
    now = 50_000_000
    state = EmbeddingState(0)
    for user in range(3):
        state.work.touch(user, now, now - 10, False)  # known users, re-embedding due
    state.work.touch(100, now, now, True)  # a new user
    refresher = EmbedCounting(Settings(), cost_s=0.0)
    refresher.models = type("M", (), {"embedding_model": "sage-test"})()
    refresher.embed_due([state], now, budget_s=10.0, new_only=True)  # type: ignore[list-item]
    assert refresher.embedded == [[100]]
    assert state.work.embeddings_due(now) == [0, 1, 2]
    refresher.embed_due([state], now, budget_s=10.0)  # type: ignore[list-item]
    assert refresher.embedded[1:] == [[0, 1, 2]] and not state.work.embeddings_due(now)


def test_pending_work_says_whether_a_list_is_owed() -> None:
    work = PendingWork(DictRowStore())
    assert not work.has_refreshes()
    work.touch(1, 1_000, 1_000, False)  # an embedding only
    assert not work.has_refreshes()
    work.touch(2, 1_000, None, True)
    assert work.has_refreshes()
    work.refreshed(2)
    assert not work.has_refreshes()


class SliceRefresher:
    """What refresh_now and flush call of a Refresher: two users' lists ranked (and marked refreshed, as serve()
    does)."""

    def __init__(self) -> None:
        self.stats = RefreshStats()

    def collect(self, state: Any, now_ms: int) -> None:
        pass

    def observe_input_backlog(self, backlog: int) -> bool:
        return False

    def embed_due(self, states: Any, now_ms: int, **kwargs: Any) -> list[Any]:
        return []

    def embed_alongside_lists(self, states: Any, now_ms: int) -> list[Any]:
        return []

    async def prefetch_ann(self, states: Any, now_ms: int) -> None:
        pass

    async def fetch_facts(self) -> None:
        pass  # every user-globals record held: nothing to fetch

    def ann_wanted(self, states: Any, now_ms: int) -> list[tuple[int, frozenset[int]]]:
        return []  # one index on the worker: nothing to gather

    def refresh_due(self, states: Any, now_ms: int, budget_s: float | None = None, **kwargs: Any) -> list[Any]:
        out = []
        for state in states:
            for _, _, user in state.work.refreshes():
                state.work.refreshed(user)
                out.append((Recommendations(user, now_ms, "test", ()), []))
        return out


def test_lists_ranked_between_flushes_but_not_sent_go_with_the_next_flush(tmp_path: Any) -> None:
    """A slice interrupted between two sends (the worker stopping, or the producer failing) leaves its users marked
    refreshed: the last flush must send what the slice could not before it writes that down, or their lists
    would never be sent; and before any newer list of theirs (the compacted topic keeps the last)."""
    sends: list[bytes] = []
    stopping = [True]

    async def send(topic: str, key: bytes | None, value: bytes, partition: int | None) -> Any:
        if sends and stopping[0]:
            raise asyncio.CancelledError
        sends.append(key or b"")
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    worker = WorkerState(tmp_path, 1, lambda user: 0, "m", "g", "d", send,
                         refresher=SliceRefresher(), topics=OutputTopics("e", "r", "i", "u"))  # type: ignore[arg-type]
    worker.open_partitions([0])
    state = worker.owned[0]
    for user in (5, 6):
        state.work.touch(user, 1_000, None, True)

    async def scenario() -> None:
        with pytest.raises(asyncio.CancelledError):
            await worker.refresh_now(0.01)
        assert sends == [b"5"] and [key for _, key, _, _ in worker.unsent] == [b"6"]
        stopping[0] = False
        state.work.touch(6, 2_000, None, True)  # a newer change: the flush ranks 6 again (while catching up)
        worker.between_flushes_max_backlog = None
        await worker.flush()
        assert sends == [b"5", b"6", b"6"]  # the slice's list of 6, then the flush's newer one
        assert worker.unsent == [] and state.work.refreshes() == []

    asyncio.run(scenario())
    state.store.close()


class GatheringRefresher(SliceRefresher):
    """A sharded worker's refresher: the owed users' ANN answers gathered from peers that answer when told to."""

    def __init__(self) -> None:
        super().__init__()
        self.gathering = asyncio.Event()
        self.answer = asyncio.Event()
        self.installed: list[Any] = []
        self.collects = 0

    def collect(self, state: Any, now_ms: int) -> None:
        self.collects += 1

    def ann_wanted(self, states: Any, now_ms: int) -> list[tuple[int, frozenset[int]]]:
        return [(user, frozenset()) for state in states for _, _, user in state.work.refreshes()]

    async def gather_ann(self, wanted: list[tuple[int, frozenset[int]]]) -> dict[int, Any]:
        self.gathering.set()
        await self.answer.wait()
        return {user: "answer" for user, _ in wanted}

    def install_ann(self, gathered: dict[int, Any]) -> None:
        self.installed.append(gathered)


@pytest.mark.parametrize("when", ["between flushes", "in a flush"])
def test_a_sharded_gather_is_awaited_without_the_state_lock(tmp_path: Any, when: str) -> None:
    """The shards' answers are awaited with the lock released — by a slice between flushes, and by a flush that
    ranks (the input behind) before it takes the lock for the commit: ingest (and a flush) go on while the peers
    answer; the lists are ranked after the lock is taken again, from the gathered answers, with the state changes
    applied meanwhile collected first (the kept lists must hear of them before they are updated), and the list of
    a user touched meanwhile goes out with them."""
    sends: list[bytes] = []

    async def send(topic: str, key: bytes | None, value: bytes, partition: int | None) -> Any:
        sends.append(key or b"")
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    refresher = GatheringRefresher()
    worker = WorkerState(tmp_path, 1, lambda user: 0, "m", "g", "d", send,
                         refresher=refresher, topics=OutputTopics("e", "r", "i", "u"))  # type: ignore[arg-type]
    worker.open_partitions([0])
    worker.between_flushes_max_backlog = None  # a flush ranks
    state = worker.owned[0]
    state.work.touch(5, 1_000, None, True)

    async def scenario() -> None:
        task = asyncio.create_task(worker.refresh_now(0.01) if when == "between flushes" else worker.flush())
        await asyncio.wait_for(refresher.gathering.wait(), 5)
        assert not worker.lock.locked()  # the peers are awaited without the lock
        async with worker.lock:  # ingest meanwhile: another user's change
            state.work.touch(6, 2_000, None, True)
        collected = refresher.collects
        refresher.answer.set()
        await asyncio.wait_for(task, 5)
        assert refresher.installed == [{5: "answer"}]
        assert refresher.collects == collected + 1  # collected again before ranking
        assert sends == [b"5", b"6"] and state.work.refreshes() == []
        assert worker.stats.flushes == (when == "in a flush")

    asyncio.run(scenario())
    state.store.close()


def test_outboxes_are_sent_between_flushes_and_what_was_not_sent_goes_with_the_flush(tmp_path: Any) -> None:
    """A connection's other half (another partition) leaves between flushes; a slice interrupted before sending it
    hands it to the next flush, which would otherwise write the connection down with its other half lost."""
    sent: list[tuple[str, int | None]] = []
    fail_after: list[int] = [0]

    async def send(topic: str, key: bytes | None, value: bytes, partition: int | None) -> Any:
        if len(sent) >= fail_after[0]:
            raise asyncio.CancelledError
        sent.append((topic, partition))
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    worker = WorkerState(tmp_path, 2, lambda user: user % 2, "m", "g", "d", send,
                         refresher=SliceRefresher(), topics=OutputTopics("e", "r", "i", "u"))  # type: ignore[arg-type]
    worker.open_partitions([0, 1])
    worker.owned[0].graph.apply_connection(2, 3, "add", 1_000)  # 3 lives in partition 1

    async def scenario() -> None:
        with pytest.raises(asyncio.CancelledError):  # the slice is interrupted before its first send
            await worker.refresh_now(0.01)
        assert sent == [] and worker.unsent
        fail_after[0] = 1_000
        await worker.flush()
        assert ("m", 1) in sent  # the edge half for partition 1 went with the flush
        assert worker.unsent == []

        sent.clear()
        worker.owned[0].graph.apply_connection(2, 5, "add", 2_000)
        assert await worker.refresh_now(0.01) >= 1
        assert ("m", 1) in sent and len(worker.in_flight) == len(sent)  # sent now, awaited by the flush
        assert worker.stats.messages_between_flushes >= 1
        await worker.flush()
        assert worker.in_flight == []

    asyncio.run(scenario())
    for state in worker.owned.values():
        state.store.close()


class _FakeIndex:
    """The versions a worker's index holds, and what it is given."""

    def __init__(self, versions: dict[int, int]) -> None:
        self.versions = dict(versions)
        self.applied: list[Any] = []

    def apply_many(self, records: list[Any]) -> None:
        self.applied.extend(records)


class _ZeroEmbedder:
    def embed(self, users: list[int], salt: int) -> list[np.ndarray]:
        return [np.ones(4, dtype=np.float32) / 2 for _ in users]


def test_an_embedding_of_a_partition_taken_over_without_its_state_beats_the_previous_owners() -> None:
    # A killed worker's records (version 7 of user 5) are in every index; the partition's new owner, on another
    # machine, has no row for user 5. Its record must be numbered past 7, or every index would keep the old vector.
    from pymk.index.records import EmbeddingRecord
    from pymk.streams.work import EmbeddingStore

    refresher = CountingRefresher(Settings(), cost_s=0.0)
    refresher.index = _FakeIndex({5: 7})  # type: ignore[assignment]
    refresher.models = type("M", (), {"embedding_model": "sage-test"})()  # type: ignore[assignment]
    refresher.embedder = lambda state: _ZeroEmbedder()  # type: ignore[method-assign]
    state = FakeState()
    state.embeddings = EmbeddingStore(DictRowStore())  # type: ignore[attr-defined]
    state.embeddings.put(EmbeddingRecord(6, 2, 0, "sage-test", np.ones(4, dtype=np.float32)))
    records = refresher._embed(state, [5, 6, 9], now_ms=1_000, salt=0)  # type: ignore[arg-type]
    assert [(r.user, r.version) for r in records] == [(5, 8), (6, 3), (9, 1)]
    assert refresher.index.applied == records  # type: ignore[attr-defined]


class ListsAndEmbeddings(EmbedCounting):
    """Ranking that costs ``list_cost_s`` per list, embedding that costs ``cost_s`` per chunk."""

    def __init__(self, settings_: Settings, cost_s: float, list_cost_s: float) -> None:
        super().__init__(settings_, cost_s)
        self.list_cost_s = list_cost_s
        self.models = type("M", (), {"embedding_model": "sage-test"})()

    def rank(self, state: Any, user: int, now_ms: int) -> Any:
        self.ranked.append(user)
        time.sleep(self.list_cost_s)
        return (user, now_ms), []


def test_reembeddings_get_their_share_of_the_time_while_lists_are_owed() -> None:
    """Between flushes with lists owed, re-embeddings of known users run once the lists have earned them time
    (``reembed_share`` of theirs), a chunk at a time, longest due first; with the share at 0 they wait."""
    now = 50_000_000
    state = EmbeddingState(0)
    for user in range(40):
        state.work.touch(user, now, now - 10 * user, False)  # known users, re-embedding due
    for user in range(200, 260):
        state.work.touch(user, now, None, True)  # lists owed
    refresher = ListsAndEmbeddings(Settings(reembed_share=0.25), cost_s=0.001, list_cost_s=0.002)
    assert refresher.embed_alongside_lists([state], now) == []  # no list ranked yet: nothing earned
    refresher.refresh_due([state], now, budget_s=0.02)  # type: ignore[list-item]
    assert refresher.ranked and refresher.embedded == []
    refresher.embed_alongside_lists([state], now)  # type: ignore[list-item]
    assert refresher.embedded[0] == list(range(39, 39 - EMBED_CHUNK, -1))  # one chunk, longest due first
    for _ in range(30):
        if not state.work.has_refreshes():
            break
        refresher.refresh_due([state], now, budget_s=0.02)  # type: ignore[list-item]
        refresher.embed_alongside_lists([state], now)  # type: ignore[list-item]
    assert sorted(u for batch in refresher.embedded for u in batch) == list(range(40))

    idle = EmbeddingState(0)
    idle.work.touch(1, now, now - 10, False)
    idle.work.touch(200, now, None, True)
    never = ListsAndEmbeddings(Settings(reembed_share=0.0), cost_s=0.0, list_cost_s=0.002)
    never.refresh_due([idle], now, budget_s=0.02)  # type: ignore[list-item]
    assert never.embed_alongside_lists([idle], now) == [] and never.embedded == []  # type: ignore[list-item]
