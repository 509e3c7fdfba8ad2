"""Tier 3: lists published by a running worker (real broker) — invariants after a replay, dismissals, and the
refresh of both users of a new connection."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

from pymk.events import ConnectionEvent, DismissalEvent, Recommendations
from pymk.settings import Settings
from pymk.streams.topics import ensure_topics
from stream_helpers import dismissals, final_graph, latest_lists, send, settle, small_network
from workers import http_get, running_worker, wait_until


def now_ms() -> int:
    return int(time.time() * 1000)


def assert_list_valid(recs: Recommendations, neighbours: set[int], dismissed: set[int], k: int = 20) -> None:
    candidates = [item.candidate for item in recs.items]
    assert len(candidates) == len(set(candidates)), f"duplicates in the list of {recs.user}"
    assert len(candidates) <= k
    assert [item.rank for item in recs.items] == list(range(1, len(candidates) + 1))
    assert recs.user not in candidates
    assert not set(candidates) & neighbours, f"{recs.user}: existing connections {set(candidates) & neighbours}"
    assert not set(candidates) & dismissed, f"{recs.user}: dismissed candidates {set(candidates) & dismissed}"
    assert recs.model_version
    scores = [item.score for item in recs.items]
    assert scores == sorted(scores, reverse=True)
    for item in recs.items:
        assert item.sources and set(item.sources) <= {"graph", "ann", "popular"}
        assert "mutual_connections" in item.reasons and "text" in item.reasons


def latest_for(settings: Settings, user: int) -> Recommendations | None:
    body = http_get(settings, f"/recommendations/{user}")
    return None if body["generated_at"] is None else Recommendations.from_json(json.dumps(body))


def test_published_lists_keep_the_invariants_and_follow_changes(kafka_settings: Settings, tmp_path: Path) -> None:
    # two-hop scope: a change next to a user refreshes their list too, so every last list is exact at the end
    settings = replace(kafka_settings, reembed_min_interval_ms=0, refresh_scope="two-hop")
    ensure_topics(settings)
    events = small_network(240, seed=3)
    send(settings, events)
    with running_worker(settings, tmp_path / "worker.log"):
        settle(settings, [settings])
        graph = final_graph(events)
        dismissed = dismissals(events)
        lists = latest_lists(settings)
        assert len(lists) >= 0.9 * graph.number_of_nodes()
        for user, recs in lists.items():
            neighbours = set(graph[user]) if user in graph else set()
            assert_list_valid(recs, neighbours, dismissed.get(user, set()))
            for item in recs.items:  # mutual counts are exact
                if item.candidate in graph and user in graph:
                    assert item.reasons["mutual_connections"] == len(set(graph[user]) & set(graph[item.candidate]))
        # the debug API shows the same list as the topic
        some_user = max(lists, key=lambda u: len(lists[u].items))
        assert latest_for(settings, some_user) == lists[some_user]

        # a dismissal removes the candidate from the next list
        before = lists[some_user]
        dismissed_candidate = before.items[0].candidate
        send(settings, [DismissalEvent(some_user, dismissed_candidate, now_ms())])
        after = wait_until(lambda: (r := latest_for(settings, some_user)) and r.generated_at > before.generated_at
                           and r, 30, what="a new list after the dismissal")
        assert dismissed_candidate not in [item.candidate for item in after.items]

        # a new connection refreshes both users, and each leaves the other's list
        other = next(item.candidate for item in after.items)
        other_before = latest_for(settings, other)
        send(settings, [ConnectionEvent(some_user, other, "add", now_ms())])
        new_user = wait_until(lambda: (r := latest_for(settings, some_user)) and r.generated_at > after.generated_at
                              and r, 30, what="a new list for the first user")
        new_other = wait_until(lambda: (r := latest_for(settings, other)) and (
            other_before is None or r.generated_at > other_before.generated_at) and r, 30,
            what="a new list for the second user")
        assert other not in [item.candidate for item in new_user.items]
        assert some_user not in [item.candidate for item in new_other.items]

        # removing it refreshes both again (the former neighbour may come back)
        send(settings, [ConnectionEvent(other, some_user, "remove", now_ms() + 1)])
        wait_until(lambda: latest_for(settings, some_user).generated_at > new_user.generated_at
                   and latest_for(settings, other).generated_at > new_other.generated_at, 30,
                   what="new lists after the removal")
        settle(settings, [settings])
        final = latest_lists(settings)
        assert final[some_user] == latest_for(settings, some_user)


def refreshed_since(settings: Settings, before: dict[int, Recommendations | None]) -> bool:
    """Whether every user in ``before`` has a list newer than the one given (None: none before)."""
    for user, old in before.items():
        new = latest_for(settings, user)
        if new is None or (old is not None and new.generated_at <= old.generated_at):
            return False
    return True


def test_lists_are_ranked_and_sent_between_flushes(kafka_settings: Settings, tmp_path: Path) -> None:
    """With ranking between flushes on, a dismissal's new list is ranked and sent as soon as the worker has
    applied the event, instead of waiting for the next flush (which ranks the lists when it is off). A flush may
    still fall in between by chance (they run every 3 s here), so three dismissals are tried and at least one
    list must be published with no flush in between; every one is ranked between flushes. (A dismissal changes
    its user's partition only; the second user of a connection in another partition learns of it from a
    message the flush sends.)"""
    settings = replace(kafka_settings, refresh_between_flushes_ms=25, flush_interval_ms=3000)
    ensure_topics(settings)
    send(settings, small_network(120, seed=5))
    with running_worker(settings, tmp_path / "worker.log"):
        settle(settings, [settings])
        lists = latest_lists(settings)
        users = sorted(u for u in lists if len(lists[u].items) >= 2)
        without_a_flush = 0
        for user in users[:3]:
            before = latest_for(settings, user)
            assert before is not None
            dismissed = before.items[0].candidate
            stats = http_get(settings, "/stats")
            flushes, between = stats["state"]["flush"]["flushes"], stats["refresh"]["lists_between_flushes"]
            send(settings, [DismissalEvent(user, dismissed, now_ms())])
            wait_until(partial(refreshed_since, settings, {user: before}), 30, interval=0.05,
                       what="a new list after the dismissal")
            stats = http_get(settings, "/stats")
            without_a_flush += stats["state"]["flush"]["flushes"] == flushes
            assert stats["refresh"]["lists_between_flushes"] >= between + 1
            after = latest_for(settings, user)
            assert after is not None and dismissed not in [item.candidate for item in after.items]
        assert without_a_flush >= 1, "every new list waited for a flush"


def test_debug_features_are_the_ranking_rows_of_the_published_items(kafka_settings: Settings,
                                                                    tmp_path: Path) -> None:
    """``/features/{u}/{v}`` and the feature matrix the ranker scored are one code path: after every list is
    ranked again on the final state, each shown item's logged features equal the debug answer for the pair."""
    from pymk.events import Impression
    from pymk.streams.stream_training import read_topic
    from stream_helpers import final_refresh

    settings = replace(kafka_settings, reembed_min_interval_ms=0)
    ensure_topics(settings)
    send(settings, small_network(120, seed=9))
    with running_worker(settings, tmp_path / "worker.log"):
        final_refresh(settings, [settings])
        lists = latest_lists(settings)
        shown = {(i.user, i.candidate): i for i in map(Impression.from_json,
                                                       read_topic(settings, settings.topic("impressions")))
                 if i.rank > 0 and lists.get(i.user) is not None and i.ts == lists[i.user].generated_at}
        assert len(shown) >= 200
        for (user, candidate), impression in sorted(shown.items())[:300]:
            answer = http_get(settings, f"/features/{user}/{candidate}")
            assert answer["as_of"] == impression.as_of
            got = {name: answer["features"][name]["value"] for name in impression.features}
            assert got == impression.features, (user, candidate)
