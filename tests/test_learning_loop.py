"""Tier 3: the loop closes — a worker serves with the cold-start model, logs impressions, a ranker is trained
from the stream (impressions + what users did next), the running worker reloads it without a restart and
publishes every list after it with the new version; Recall@20 on the next period of the lists it publishes
then is not below that of the lists the cold-start model publishes from the same state after a rollback, beyond
the paired comparison's noise (two standard errors).

The network is not the one the shipped cold-start model was trained on (the generator's defaults): here most
connections go through a shared company, school or city and few close a triangle (``WORLD``). That is the case
the loop exists for: traffic that behaves unlike the data the default was trained on. In the generator's own
world the default is already that world's model, and one period of a 700-user network moves it within noise
(-3.7 % and +1.5 % in two runs, see docs/benchmarks.md)."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from pymk.events import ConnectionEvent, Recommendations
from pymk.ranking.model_store import SHIPPED_DEFAULT, rollback
from pymk.settings import Settings
from pymk.streams.consumer import latest_per_user, read_recommendations
from pymk.streams.producer import send_commands
from pymk.streams.stream_training import train_from_stream
from pymk.streams.topics import ensure_topics
from pymk.synthetic import SyntheticConfig, synthetic_network
from stream_helpers import final_graph, send, settle
from workers import http_get, running_worker, wait_until

RELOAD_BOUND_S = 150.0  # a new model served within it (model_reload_interval_s below is 1 s)

# Homophily-driven: 10 % of connection attempts try to close a triangle (default 50 %), accepted with p 0.1 per
# mutual (0.35); 95 % of the others go through a shared community (85 %).
WORLD = SyntheticConfig(n_users=700, seed=21, triadic_share=0.1, homophily=0.95, closure_prob=0.1)


def recall_at_20(lists: dict, future: dict[int, set[int]]) -> float:
    recalls = [len({item.candidate for item in lists[u].items[:20]} & partners) / len(partners)
               for u, partners in future.items() if partners and u in lists]
    return sum(recalls) / len(recalls)


def test_ranker_retrained_from_the_stream_is_reloaded_live(kafka_settings: Settings,
                                                                          tmp_path: Path) -> None:
    events = synthetic_network(WORLD)
    first, second = int(len(events) * 0.6), int(len(events) * 0.8)
    period1, period2, period3 = events[:first], events[first:second], events[second:]
    known = final_graph(period1 + period2)
    future: dict[int, set[int]] = {}
    for e in period3:
        if isinstance(e, ConnectionEvent) and e.action == "add" and not known.has_edge(e.src, e.dst):
            future.setdefault(e.src, set()).add(e.dst)
            future.setdefault(e.dst, set()).add(e.src)

    learning = replace(kafka_settings, model_reload_interval_s=1.0, home=tmp_path / "learning")
    ensure_topics(learning)

    def serving() -> str:
        return http_get(learning, "/stats")["models"]["ranker"]["version"]

    def publish_every_list() -> dict[int, Recommendations]:
        """Every user's list ranked again from the same state (no event in between), the latest per user."""
        send_commands(learning)
        time.sleep(2)
        settle(learning, [learning])
        return latest_per_user(read_recommendations(learning))

    with running_worker(learning, tmp_path / "learning.log"):
        # live traffic, not a backlog: lists are ranked as of the event time they were shown at, so the days
        # after each impression can label it (a backlog would be ranked as of its end, with nothing after it)
        send(learning, period1, rate=400)
        settle(learning, [learning])
        default_version = serving()

        report = train_from_stream(learning)
        assert report["labelled"] > 1000 and report["outcomes"]["connected"] > 50, report
        # a bound on "eventually", not a speed check: the load (the tree evaluator compiled on a thread that shares
        # the interpreter with a busy worker) took over 30 s with the suite's other process on the second core
        wait_until(lambda: serving() == report["version"], RELOAD_BOUND_S,
                   what="the worker serving the retrained model")

        send(learning, period2)
        settle(learning, [learning])
        learned = publish_every_list()  # as of the end of period 2, by the retrained model
        # the default on the very same state: one rollback command, reloaded live (two workers, one per model,
        # would differ by more than their models: which users were embedded when, HNSW insertion order)
        assert rollback(learning.model_dir / "ranker") == SHIPPED_DEFAULT
        wait_until(lambda: serving() == default_version, RELOAD_BOUND_S, what="the worker serving the default again")
        defaults = publish_every_list()

    assert {recs.model_version for recs in learned.values()} == {report["version"]}
    assert {recs.model_version for recs in defaults.values()} == {default_version}
    assert learned.keys() == defaults.keys()
    learned_recall, default_recall = recall_at_20(learned, future), recall_at_20(defaults, future)
    # paired by user: the retrained lists against the cold-start ones on the same state. The model is promoted on a
    # validation lead that can be a few thousandths (which impressions a live run logs depends on its timing), so
    # the period-3 comparison is judged against its own noise: the retrained model must not be worse by more than
    # two standard errors of the mean paired difference (a CI run had 0.2366 against 0.2406, -0.004, on a
    # validation lead of 0.0006; others had the retrained model ahead)
    differences = [len({i.candidate for i in learned[u].items[:20]} & partners) / len(partners)
                   - len({i.candidate for i in defaults[u].items[:20]} & partners) / len(partners)
                   for u, partners in future.items() if partners and u in learned]
    mean = sum(differences) / len(differences)
    spread = (sum((d - mean) ** 2 for d in differences) / (len(differences) - 1)) ** 0.5
    standard_error = spread / len(differences) ** 0.5
    print(f"Recall@20 on period 3: retrained {learned_recall:.4f} vs cold start ({default_version}) "
          f"{default_recall:.4f} (paired difference {mean:+.4f} ± {standard_error:.4f}, {len(differences)} users); "
          f"training report {report}")
    assert default_recall > 0 and learned_recall > 0
    assert mean > -2 * standard_error, (mean, standard_error)
