"""``wait_idle``'s rule for workers that do not answer (streams/lag.py), with the lag and /health reads stubbed:
no broker, no worker."""

from __future__ import annotations

from typing import Any

import pytest

from pymk.settings import Settings
from pymk.streams import lag
from pymk.streams.lag import WorkerUnreachable, wait_idle


def stub(monkeypatch: pytest.MonkeyPatch, unanswered: list[bool]) -> None:
    """/health fails while ``unanswered`` pops True, answers "nothing owed" after."""
    monkeypatch.setattr(lag, "consumer_lag", lambda settings, topics=None: {})

    def pending_work(urls: list[str]) -> int:
        if unanswered and unanswered.pop(0):
            raise WorkerUnreachable(urls[0], "stub: not listening yet")
        return 0

    monkeypatch.setattr(lag, "pending_work", pending_work)


def test_a_worker_not_answering_stops_the_wait_after_the_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    stub(monkeypatch, [True, True, True])
    with pytest.raises(WorkerUnreachable):
        wait_idle(Settings(), timeout_s=30, settle_s=0.0, worker_urls=["http://w"], unreachable_grace_s=0.0)


def test_a_worker_just_started_gets_the_startup_grace_before_its_first_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    stub(monkeypatch, [True, True])  # two polls (0.5 s apart) before it listens
    assert wait_idle(Settings(), timeout_s=30, settle_s=0.0, worker_urls=["http://w"], unreachable_grace_s=0.0,
                     startup_grace_s=20.0)


def test_after_its_first_answer_a_worker_gets_only_the_plain_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []
    monkeypatch.setattr(lag, "consumer_lag", lambda settings, topics=None: {"t": 1})  # busy: keeps polling

    def pending_work(urls: list[str]) -> int:
        calls.append(1)
        if len(calls) > 1:  # answered once, then gone
            raise WorkerUnreachable(urls[0], "stub: stopped")
        return 0

    monkeypatch.setattr(lag, "pending_work", pending_work)
    with pytest.raises(WorkerUnreachable):
        wait_idle(Settings(), timeout_s=30, settle_s=0.0, worker_urls=["http://w"], unreachable_grace_s=0.0,
                  startup_grace_s=20.0)
    assert len(calls) == 2
