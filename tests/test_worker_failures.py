"""Tier 1: nothing about one input message or one user stops a worker (streams/errors.py) — dead letters that
always fit the producer's limit, the ingest path fuzzed with arbitrary keys and values over real RocksDB state,
a user whose list or embedding fails skipped and reported, a record the broker refuses dead-lettered, the
read-only rule of the debug reads, and training that refuses thin data and promotes only a better model."""

from __future__ import annotations

import asyncio
import json
import string
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_refresh_policy import CountingRefresher, FakeState

from pymk.events import (
    DEAD_LETTER_KEY_BYTES,
    DEAD_LETTER_RECORD_BYTES,
    ConnectionEvent,
    DeadLetter,
    DismissalEvent,
    EngagementEvent,
    Profile,
    ProfileViewEvent,
    UserEvent,
)
from pymk.ranking.model_store import TrainingRefused, check_split_classes, promotion
from pymk.settings import INPUT_KINDS, Settings
from pymk.streams.errors import InternalErrors
from pymk.streams.ingest import InputRules, ingest_message
from pymk.streams.partitioning import partition_for_user
from pymk.streams.state import WorkerState
from pymk.validation import Invalid

PRODUCER_LIMIT = 4 * 1024 * 1024
NOW_MS = 1_700_000_000_000


# ---- dead letters are always sendable -----------------------------------------------------------------------
@pytest.mark.parametrize("key", [b"k" * (2100 << 10), b"\x01" * (1 << 20), b"\xff" * (1536 << 10)],
                         ids=["2100KiB-k", "1MiB-ctrl", "1536KiB-invalid-utf8"])
def test_a_huge_key_gives_a_dead_letter_that_fits_the_producer(key: bytes) -> None:
    letter = DeadLetter.for_message("pymk.connections", 3, 17, "invalid_json: no", b"not json", key=key)
    record = letter.to_json()
    assert len(record) + len(letter.record_key or b"") < DEAD_LETTER_RECORD_BYTES < PRODUCER_LIMIT
    assert letter.key_truncated and letter.key_size == len(key)
    assert letter.record_key == key[:DEAD_LETTER_KEY_BYTES]  # cut, not re-encoded
    back = DeadLetter.from_json(record)
    assert back == letter and back.raw_bytes() == b"not json" and not back.truncated


def test_escaping_cannot_inflate_a_dead_letter_past_its_bound() -> None:
    value = b"\x01" * (4 << 20)  # 6 bytes of JSON per byte as text; a limit as large as the producer's
    letter = DeadLetter.for_message("pymk.users", 0, 1, "oversize: big", value, key=b"1", limit=4 << 20)
    assert len(letter.to_json()) <= DEAD_LETTER_RECORD_BYTES
    assert letter.truncated and letter.size == len(value)
    assert letter.raw_bytes() == value[: len(letter.raw_bytes())]


def test_a_small_key_is_kept_as_received() -> None:
    for key in (b"42", "é".encode(), b"\xfe\x00"):
        letter = DeadLetter.for_message("t", 0, 0, "invalid_json: x", b"{", key=key)
        assert letter.record_key == key and not letter.key_truncated and letter.key_size == len(key)
    assert DeadLetter.for_message("t", 0, 0, "r", b"{").record_key is None


def test_a_cut_value_keeps_its_text_whole_characters_only() -> None:
    value = ("é" * 100).encode()  # 2 bytes each: a cut at 101 bytes falls inside a character
    letter = DeadLetter.for_message("t", 0, 0, "oversize: x", value, limit=101)
    assert letter.raw_encoding == "utf-8" and letter.raw == "é" * 50 and letter.truncated


# ---- the ingest path, fuzzed ------------------------------------------------------------------------------------
class Message:
    def __init__(self, topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None) -> None:
        self.topic, self.partition, self.offset, self.key, self.value = topic, partition, offset, key, value


PARTITIONS = 2


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Any:
    async def send(*args: Any) -> Any:
        raise AssertionError("nothing is sent here")

    state = WorkerState(tmp_path_factory.mktemp("state"), PARTITIONS, lambda u: partition_for_user(u, PARTITIONS),
                        "m", "g", "dl", send)
    state.open_partitions(range(PARTITIONS))
    yield state
    for partition in state.owned.values():
        partition.store.close()


RULES = InputRules(64 * 1024, 24 * 3600 * 1000, lambda kind: f"pymk.{kind}")
ids = st.integers(min_value=0, max_value=2**63 - 1)
stamps = st.integers(min_value=0, max_value=NOW_MS)
valid_values = st.one_of(
    st.builds(lambda a, b, act, ts: ConnectionEvent(a, b, act, ts).to_json(), ids, ids,
              st.sampled_from(["add", "remove"]), stamps),
    st.builds(lambda a, b, ts: ProfileViewEvent(a, b, ts).to_json(), ids, ids, stamps),
    st.builds(lambda a, b, ts: DismissalEvent(a, b, ts).to_json(), ids, ids, stamps),
    st.builds(lambda a, b, ts: EngagementEvent(a, b, ts).to_json(), ids, ids, stamps),
    st.builds(lambda a, ts, company: UserEvent(a, ts, Profile(company=company)).to_json(), ids, stamps,
              st.text(string.printable, max_size=20)),
)
values = st.one_of(st.none(), st.binary(max_size=300), valid_values,
                   valid_values.map(lambda raw: raw[: len(raw) // 2]),  # cut
                   st.builds(lambda obj: json.dumps(obj).encode(), st.recursive(
                       st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                       lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                           st.sampled_from(["src", "dst", "user", "viewer", "viewed", "candidate", "item", "ts",
                                            "action", "profile", "geo", "skills"]), inner, max_size=5),
                       max_leaves=12)))
keys = st.one_of(st.none(), st.binary(max_size=64), st.binary(min_size=2000, max_size=5000))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(INPUT_KINDS), key=keys, value=values, partition=st.integers(0, PARTITIONS - 1))
def test_no_key_or_value_makes_the_ingest_path_raise(worker: WorkerState, kind: str, key: bytes | None,
                                                     value: bytes | None, partition: int) -> None:
    state = worker.owned[partition]
    worker.dead_letters.clear()
    before = _footprint(state)
    result = ingest_message(worker, state, kind, Message(f"pymk.{kind}", partition, 5, key, value), NOW_MS, RULES)
    assert result is not None, worker.dead_letters  # no internal error: every input is handled by validation
    if isinstance(result, Invalid):
        assert len(worker.dead_letters) == 1
        record_key, record = worker.dead_letters[0]
        assert len(record) + len(record_key or b"") <= DEAD_LETTER_RECORD_BYTES
        assert DeadLetter.from_json(record).reason.startswith(result.code)
    else:
        assert not worker.dead_letters
        # a valid event changes the state, or is already in it (an at-least-once duplicate merges into nothing)
        assert _footprint(state) != before or _already_applied(state, result)


def _footprint(state: Any) -> tuple[Any, ...]:
    return (state.event_time_ms, len(state.forward), state.graph.stats.__dict__.copy(),
            state.behaviour.stats.__dict__.copy(), sorted(state.changed_profiles),
            len(state.graph.take_outbox()[0]))


def _already_applied(state: Any, event: Any) -> bool:
    if isinstance(event, ConnectionEvent):
        return True  # registers: a repeated or older one changes nothing, by design
    return event.ts <= state.event_time_ms


def test_a_failure_of_our_own_code_on_one_message_is_dead_lettered(worker: WorkerState,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    state = worker.owned[0]
    worker.dead_letters.clear()

    def broken(*args: Any) -> None:
        raise OverflowError("Python int too large to convert to C long")

    monkeypatch.setattr(state.graph, "apply_connection", broken)
    raw = ConnectionEvent(1, 2, "add", NOW_MS).to_json()
    result = ingest_message(worker, state, "connections", Message("pymk.connections", 0, 9, b"1", raw), NOW_MS,
                            RULES)
    assert result is None
    letter = DeadLetter.from_json(worker.dead_letters[-1][1])
    assert letter.reason.startswith("internal_error: applying pymk.connections[0]@9: OverflowError: Python int")
    assert "test_worker_failures.py" in letter.reason  # where it failed
    assert letter.raw_bytes() == raw and letter.offset == 9
    assert worker.errors.by_stage["applying"] == 1


# ---- one user's list or embedding ---------------------------------------------------------------------------
class FailingRefresher(CountingRefresher):
    def rank(self, state: Any, user: int, now_ms: int) -> Any:
        if user == 4:
            raise OverflowError("Python int too large to convert to C long")
        return super().rank(state, user, now_ms)


def test_a_user_whose_list_fails_is_reported_and_skipped_the_others_are_served() -> None:
    now = 10_000_000
    state = FakeState()
    for user in range(8):
        state.work.touch(user, now - 1_000 * user, None, True)
    refresher = FailingRefresher(Settings(), cost_s=0.0)
    failures: list[tuple[str, int, str]] = []
    refresher.on_user_error = lambda stage, exc, st_, user: failures.append((stage, user, type(exc).__name__))
    out = refresher.refresh_due([state], now, budget_s=10.0)  # type: ignore[list-item]
    assert sorted(refresher.ranked) == [0, 1, 2, 3, 5, 6, 7] and len(out) == 7
    assert failures == [("ranking", 4, "OverflowError")]
    assert state.work.refreshes() == []  # not owed again until its next change: no loop on a poison user
    without = FailingRefresher(Settings(), cost_s=0.0)  # no handler (a pure caller): the failure propagates
    state.work.touch(4, now, None, True)
    with pytest.raises(OverflowError):
        without.refresh_due([state], now, budget_s=10.0)  # type: ignore[list-item]


def test_user_failures_and_refused_records_become_dead_letters() -> None:
    from aiokafka.errors import MessageSizeTooLargeError

    sent: list[tuple[str, bytes | None, bytes]] = []

    async def send(topic: str, key: bytes | None, value: bytes, partition: int | None) -> Any:
        if len(value) > 1000:
            raise MessageSizeTooLargeError("The message is 5000 bytes when serialized")
        sent.append((topic, key, value))
        future = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future

    worker = WorkerState(Path("/nonexistent"), 1, lambda u: 0, "m", "g", "dl", send)
    worker.user_failed("ranking", ValueError("boom"), "pymk.recommendations", 0, 77)

    async def run() -> None:
        futures, about = await worker._send_all([("pymk.recommendations", b"5", b"x" * 5000, 0),
                                                 ("pymk.recommendations", b"6", b"ok", 0)])
        await worker._wait_sent(futures, about)

    asyncio.run(run())
    # the flush's step 2 sends the dead letters made meanwhile too, and waits for them
    assert [(t, k) for t, k, _ in sent] == [("pymk.recommendations", b"6"), ("dl", b"77"), ("dl", b"5")]
    assert worker.dead_letters == []
    user_letter, refused = (DeadLetter.from_json(value) for _, _, value in sent[1:])
    assert refused.reason.startswith("internal_error: publishing a pymk.recommendations record of 5000 bytes: "
                                     "MessageSizeTooLargeError")
    assert refused.key == "5"
    assert user_letter.user == 77 and user_letter.reason.startswith("internal_error: ranking user 77: ValueError")
    assert worker.errors.by_stage == {"ranking": 1, "publishing": 1}


def test_internal_errors_are_logged_once_per_stage_and_type(caplog: pytest.LogCaptureFixture) -> None:
    errors = InternalErrors()
    with caplog.at_level("ERROR"):
        for _ in range(5):
            errors.record("ranking", KeyError(3), "user 3")
        errors.record("ranking", ValueError(3), "user 3")
    assert len([r for r in caplog.records if r.levelname == "ERROR"]) == 2
    assert errors.by_stage["ranking"] == 6


# ---- debug reads leave nothing behind ---------------------------------------------------------------------------
def test_reading_an_unknown_user_creates_no_user(worker: WorkerState) -> None:
    user = next(u for u in range(10**6, 10**6 + 100) if partition_for_user(u, PARTITIONS) == 0)
    state = worker.owned[0]
    assert not state.knows(user)
    # what the debug views read
    state.graph.neighbours(user), state.graph.common_row(user), state.profiles.profile(user)
    state.behaviour.profile_view_counts(user), state.behaviour.dismissed_candidates(user)
    assert not state.knows(user)
    assert user not in set(state.graph.local_users()) | set(state.profiles.local_users())
    puts, deletes = state.dirty_rows()
    assert not any(key.endswith(user.to_bytes(8, "big")) for key in puts)


# ---- training -----------------------------------------------------------------------------------------------------
def test_thin_training_data_is_refused_in_one_line() -> None:
    with pytest.raises(TrainingRefused) as refused:
        check_split_classes(np.array([1.0] * 5), np.array([1.0] * 3 + [0.0] * 65), "68 labelled impressions",
                            "let the workers serve longer")
    message = str(refused.value)
    assert "\n" not in message and "training 5 positive and 0 negative" in message
    assert "validation 3 positive and 65 negative" in message
    check_split_classes(np.array([1.0] * 10 + [0.0] * 10), np.array([1.0] * 10 + [0.0] * 10), "x", "y")


def test_a_new_model_is_promoted_only_when_it_beats_the_serving_one() -> None:
    assert promotion(0.30, 0.70, 0.29, 0.80)[0]
    assert not promotion(0.2909, 0.9, 0.2932, 0.6)[0]  # the case: worse Recall@20
    assert promotion(0.30, 0.71, 0.30, 0.70)[0] and not promotion(0.30, 0.70, 0.30, 0.70)[0]  # a tie stays
    assert not promotion(None, 0.9, 0.1, 0.5)[0] and not promotion(float("nan"), 0.9, 0.1, 0.5)[0]
    promote, why = promotion(0.2909, None, 0.2932, None)
    assert not promote and "0.2909" in why and "0.2932" in why


def test_metrics_are_exposed_by_prometheus_client_and_parse() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from pymk.streams.metrics import WorkerMetrics

    metrics = WorkerMetrics()
    errors = InternalErrors(listener=metrics.internal_error)
    for seconds in (0.01, 0.2, 0.2, 3.0, 120.0):
        metrics.list_refresh_seconds.observe(seconds)
    metrics.observe("connections", True, 0.001)
    metrics.observe("connections", False, 0.002, "invalid_json")
    errors.record("ranking", ValueError("x"), "user 1")
    errors.record("ranking", ValueError("x"), "user 2")
    families = {family.name: family for family in
                text_string_to_metric_families(metrics.render({"pymk.connections": 7}).decode())}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert families["pymk_list_refresh_seconds"].type == "histogram"
    assert samples[("pymk_list_refresh_seconds_bucket", (("le", "0.05"),))] == 1
    assert samples[("pymk_list_refresh_seconds_bucket", (("le", "0.25"),))] == 3
    assert samples[("pymk_list_refresh_seconds_bucket", (("le", "60.0"),))] == 4
    assert samples[("pymk_list_refresh_seconds_count", ())] == 5
    assert samples[("pymk_internal_errors_total", (("stage", "ranking"),))] == 2
    assert samples[("pymk_internal_errors_total", (("stage", "publishing"),))] == 0
    assert samples[("pymk_dead_letters_total", (("reason", "internal_error"),))] == 2
    assert samples[("pymk_dead_letters_total", (("reason", "invalid_json"),))] == 1
    assert samples[("pymk_events_processed_total", (("outcome", "invalid"), ("topic", "connections")))] == 1
    assert samples[("pymk_processing_seconds_count", (("topic", "connections"),))] == 2
    assert samples[("pymk_consumer_lag", (("topic", "pymk.connections"),))] == 7
    assert samples[("pymk_uptime_seconds", ())] >= 0


def test_the_freshness_bench_reports_lists_per_core_second() -> None:
    from pymk.bench.freshness import _lists_per_core_second

    stats = [({"refreshed": 300, "refresh_seconds": 2.0}, {}, None), ({"refreshed": 100, "refresh_seconds": 2.0}, {},
                                                                     None)]
    assert _lists_per_core_second(stats) == 100.0
    assert _lists_per_core_second([({}, {}, None)]) is None


def test_the_freshness_bench_says_how_long_sharded_gathers_held_the_state_lock() -> None:
    from pymk.bench.freshness import _ann_gathers

    assert _ann_gathers(None, {}) == {}  # one index on each worker: nothing to say
    shards = {"gathers": 10, "gather_seconds": 2.504, "peer_failures": 0}
    refresh = {"ann_gather_seconds_locked": 0.126, "not_ready": 3}
    assert _ann_gathers(shards, refresh) == {"ann_gathers": {
        "gathers": 10, "seconds": 2.5, "seconds_with_state_lock": 0.13, "lists_not_ready": 3, "peer_failures": 0}}
