"""Tier 3: SIGKILL of a worker that embeds and ranks (recommend on), at several random points of a replay, with a
restart each time; at the end every feature, every index entry and the last published list of every user equal
those of an uninterrupted run of the same events.

What "equal" means. Lists are ranked as of the partition's event time, but *when* a user is embedded or ranked
depends on the wall clock (debounce, flush budget, where the kills fell), so lists published during the replay
legitimately differ between two runs. Both runs therefore end the same way once settled: every user is
re-embedded from the final state, then every list is ranked against that final index (``final_refresh``). From
there the results are a function of the state alone — so the comparison is exact: same vectors bit for bit, same
ANN neighbours and cosines, same lists (candidates, ranks, scores, sources, reasons, model version), both on the
debug API and as the last record per user on the recommendations topic. Index membership is compared before the
final refresh too: it must not depend on timing either.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from conftest import free_port
from pymk.events import ConnectionEvent, InputEvent
from pymk.processes import start_worker_process, stop_process
from pymk.settings import Settings
from pymk.streams.lag import consumer_lag, pending_work
from pymk.streams.topics import ensure_topics
from stream_helpers import (
    differences,
    final_refresh,
    latest_lists,
    list_content,
    send,
    settle,
    small_network,
    state_view,
    users_of,
    worker_url,
)
from workers import http_get, running_worker, wait_until

KILLS = 6
TRANSIENT = (10**9 + 1, 10**9 + 2, 10**9 + 3)  # users without a profile who connect, then lose every connection


def replay_events(rng: random.Random) -> tuple[list[InputEvent], list[InputEvent]]:
    """A small synthetic network (connections with removals, views, dismissals, engagements, profiles) and
    duplicate events (at-least-once producers); then the removals that leave the transient users with
    nothing to be embedded from (their index entries must go)."""
    events = small_network(160, seed=3)
    last = max(e.ts for e in events)
    hubs = sorted(users_of(events))[:4]
    adds = [ConnectionEvent(user, hub, "add", last + 1000 * i)
            for i, (user, hub) in enumerate((u, h) for u in TRANSIENT for h in rng.sample(hubs, 2))]
    events += adds
    events += rng.sample(events, 300)
    removals: list[InputEvent] = [ConnectionEvent(e.dst, e.src, "remove", last + 100_000 + 1000 * i)
                                  for i, e in enumerate(adds)]
    return events, removals


def start(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    """A worker that answers and owns every partition (a restart joins the group again first)."""
    proc = start_worker_process(settings, log)
    wait_until(lambda: proc.poll() is None and http_get(settings, "/health")["partitions"]
               == list(range(settings.partitions)), 90, what=f"worker ready with its partitions (log {log})")
    return proc


def busy(settings: Settings) -> bool:
    """Whether the worker still has input to read or lists and embeddings to publish."""
    return sum(consumer_lag(settings).values()) > 0 or pending_work([worker_url(settings)]) > 0


def index_members(settings: Settings, users: set[int]) -> set[int]:
    return {u for u in users if http_get(settings, f"/neighbours/{u}?k=1")["embedding"] is not None}


def topic_lists(settings: Settings) -> dict[int, dict[str, Any]]:
    return {user: list_content(recs) for user, recs in latest_lists(settings).items()}


@dataclass
class RunResult:
    members: set[int]  # users in the index once settled, before the final refresh
    view: dict[int, dict[str, Any]]  # per user, after the final refresh
    topic: dict[int, dict[str, Any]]  # the last list per user on the recommendations topic


def finish(settings: Settings, users: set[int]) -> RunResult:
    settle(settings, [settings])
    members = index_members(settings, users)
    final_refresh(settings, [settings])
    return RunResult(members, state_view([settings], users), topic_lists(settings))


def uninterrupted_run(settings: Settings, events: list[InputEvent], removals: list[InputEvent],
                      users: set[int], log: Path) -> RunResult:
    ensure_topics(settings)
    with running_worker(settings, log):
        send(settings, events)
        settle(settings, [settings])  # the transient users are embedded before they lose their connections
        send(settings, removals)
        return finish(settings, users)


def test_sigkills_with_lists_and_index_end_like_an_uninterrupted_run(kafka_settings: Settings,
                                                                     tmp_path: Path) -> None:
    rng = random.Random(20)
    events, removals = replay_events(rng)
    users = users_of(events)
    # index snapshots every second, so kills land before, during and after them; the group replaces a killed
    # member after 6 s (the broker's minimum session timeout)
    base = replace(kafka_settings, index_snapshot_interval_s=1.0, reembed_min_interval_ms=1000,
                   session_timeout_s=6.0)
    tag = "ref" + base.topic_prefix
    reference = replace(base, topic_prefix=tag, app_id=tag + "-worker", home=tmp_path / "reference",
                        web_port=free_port())
    crashed = base

    with ThreadPoolExecutor(1) as pool:  # the uninterrupted run alongside (its worker is another process)
        expected_run = pool.submit(uninterrupted_run, reference, events, removals, users, tmp_path / "reference.log")

        # the same events, in chunks, with a SIGKILL at a random point while the worker is busy with each
        ensure_topics(crashed)
        log = tmp_path / "crashed.log"
        chunks = [events[i::KILLS] for i in range(KILLS)]
        chunks[-1] = chunks[-1] + removals
        proc = start(crashed, log)
        interrupted = 0
        try:
            for chunk in chunks:
                send(crashed, chunk)
                # at a random point of the chunk's work: wait until the worker is on it (a faster worker finished
                # some chunks before a fixed delay ran out), then a random part of a second
                started = time.monotonic()
                while not busy(crashed) and time.monotonic() - started < 10.0:
                    time.sleep(0.05)
                time.sleep(rng.uniform(0.0, 0.6))
                interrupted += busy(crashed)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                proc = start(crashed, log)
            got = finish(crashed, users)
        finally:
            stop_process(proc)
        expected = expected_run.result()

    assert interrupted >= 5, f"only {interrupted} of {KILLS} kills fell while the worker was busy"
    # index membership is a function of the final state: users with a connection or a profile
    assert expected.members == got.members
    assert expected.members == users - set(TRANSIENT)
    assert expected.view.keys() == got.view.keys() == users
    assert all(not view["in_index"] and view["ann"] == [] for u, view in got.view.items() if u in TRANSIENT)
    assert sum(1 for view in expected.view.values() if view["list"] and view["list"]["items"]) >= 0.9 * len(users)
    (tmp_path / "expected.json").write_text(json.dumps(expected.view, sort_keys=True))  # for a post-mortem
    (tmp_path / "got.json").write_text(json.dumps(got.view, sort_keys=True))
    assert not differences(expected.view, got.view), differences(expected.view, got.view)
    assert got.topic == expected.topic
    for user, view in expected.view.items():
        assert expected.topic.get(user) == view["list"], user
