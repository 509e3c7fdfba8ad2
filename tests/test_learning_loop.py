"""Tier 3: the loop closes — a worker serves with the cold-start model, logs impressions, a ranker is trained
from the stream (impressions + what users did next), the running worker reloads it without a restart and
publishes every list after it with the new version; Recall@20 on the next period of the lists published
afterwards is measured against a worker that kept the cold-start model.

Not asserted (yet): that the retrained model is better. With a few hundred labelled connections from one period
of a 700-user network it is not — it scores below the heuristic blend (see the closing note of issue #9); the
figure is printed so the run records it."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from conftest import free_port
from pymk.streams.consumer import latest_per_user, read_recommendations
from pymk.streams.producer import send_commands
from pymk.streams.stream_training import train_from_stream
from pymk.streams.topics import ensure_topics
from stream_helpers import final_graph, send, settle, small_network
from workers import http_get, running_worker, wait_until

from pymk.events import ConnectionEvent
from pymk.settings import Settings


def recall_at_20(lists: dict, future: dict[int, set[int]]) -> float:
    recalls = [len({item.candidate for item in lists[u].items[:20]} & partners) / len(partners)
               for u, partners in future.items() if partners and u in lists]
    return sum(recalls) / len(recalls)


def test_ranker_retrained_from_the_stream_is_reloaded_live(kafka_settings: Settings,
                                                                          tmp_path: Path) -> None:
    events = small_network(700, seed=21)
    first, second = int(len(events) * 0.6), int(len(events) * 0.8)
    period1, period2, period3 = events[:first], events[first:second], events[second:]
    known = final_graph(period1 + period2)
    future: dict[int, set[int]] = {}
    for e in period3:
        if isinstance(e, ConnectionEvent) and e.action == "add" and not known.has_edge(e.src, e.dst):
            future.setdefault(e.src, set()).add(e.dst)
            future.setdefault(e.dst, set()).add(e.src)

    learning = replace(kafka_settings, model_reload_interval_s=1.0, home=tmp_path / "learning")
    tag = "cold" + kafka_settings.topic_prefix
    cold = replace(kafka_settings, topic_prefix=tag, app_id=tag + "-worker", web_port=free_port(),
                   home=tmp_path / "cold")
    ensure_topics(learning)
    ensure_topics(cold)
    send(cold, period1)
    with running_worker(learning, tmp_path / "learning.log"), running_worker(cold, tmp_path / "cold.log"):
        # live traffic, not a backlog: lists are ranked as of the event time they were shown at, so the days
        # after each impression can label it (a backlog would be ranked as of its end, with nothing after it)
        send(learning, period1, rate=400)
        settle(learning, [learning])
        default_version = http_get(learning, "/stats")["models"]["ranker"]["version"]

        report = train_from_stream(learning)
        assert report["labelled"] > 1000 and report["outcomes"]["connected"] > 50, report
        wait_until(lambda: http_get(learning, "/stats")["models"]["ranker"]["version"] == report["version"], 30,
                   what="the worker serving the retrained model")

        for settings in (learning, cold):
            send(settings, period2)
        settle(learning, [learning])
        settle(cold, [cold])
        for settings in (learning, cold):  # both publish every list as of the end of period 2
            send_commands(settings)
        time.sleep(2)
        settle(learning, [learning])
        settle(cold, [cold])
        learned = latest_per_user(read_recommendations(learning))
        cold_lists = latest_per_user(read_recommendations(cold))

    assert {recs.model_version for recs in learned.values() if recs.generated_at > 0} >= {report["version"]}
    assert all(recs.model_version == default_version for recs in cold_lists.values())
    learned_recall, cold_recall = recall_at_20(learned, future), recall_at_20(cold_lists, future)
    print(f"Recall@20 on period 3: retrained {learned_recall:.4f} vs cold start ({default_version}) "
          f"{cold_recall:.4f}; training report {report}")
    assert learned_recall > 0 and cold_recall > 0
