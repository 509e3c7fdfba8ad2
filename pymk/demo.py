"""`make demo`: the bundled real graph through the real broker and a real worker, end to end.

Starts the local Kafka broker; trains (or loads from the cache) the GraphSAGE model and the XGBoost ranker on
the bundled CollegeMsg graph; recreates the demo's own topics (prefix ``pymk-demo``, so the demo never touches a
user's ``pymk.*`` topics); starts a worker with those models; replays CollegeMsg with behaviour plus a handful of
malformed messages; shows feature state and the published lists with their reasons, then lists changing live as
users connect and dismiss; ends with the evaluation summary (`pymk evaluate` offline) and where its plot is.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

from pymk.kafka_broker import LocalBroker
from pymk.paths import bundled_data
from pymk.processes import start_worker_process, stop_process
from pymk.settings import Settings

DATA = bundled_data("collegemsg/CollegeMsg.txt")
BAD_MESSAGES = [
    b'{"src": 1, "dst": 2, "action": "add"',  # truncated JSON
    b'{"src": 5, "dst": 5, "action": "add", "ts": 1082040961000}',  # self-connection
    b'{"src": "12", "dst": 2, "action": "add", "ts": 1082040961000}',  # id as a string
    b'{"src": 1, "dst": 2, "action": "poke", "ts": 1082040961000}',  # unknown action
    b"\xff\xfe not utf-8",
]


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def get_json(settings: Settings, path: str) -> dict:
    with urllib.request.urlopen(f"http://{settings.web_host}:{settings.web_port}{path}", timeout=5) as response:
        return json.loads(response.read())


def main() -> int:
    from pymk.streams.lag import wait_idle
    from pymk.streams.producer import event_messages, replay_events, send_messages
    from pymk.streams.topics import delete_topics_with_prefix, ensure_topics

    base = Settings.from_env()
    settings = replace(base, topic_prefix="pymk-demo", app_id="pymk-demo-worker")
    started = time.monotonic()

    say(f"1. Apache Kafka {settings.kafka_version}, a real broker on {settings.bootstrap} (no Docker)")
    broker = LocalBroker(settings)
    if broker.accepting() and not broker.status().running:
        # A broker another checkout started (the tests reuse it the same way): the demo's topics have their own
        # prefix, so sharing it is safe, and starting a second one on the same port cannot work.
        print(f"using the broker already listening on {settings.bootstrap} (started outside this checkout)")
    else:
        print(broker.start().describe())

    say("2. Models: GraphSAGE embeddings and the XGBoost ranker, trained on the bundled graph (cached)")
    events = replay_events(DATA, behaviour=True, seed=settings.produce_seed)
    sage_dir, ranker_dir = demo_models(settings, events)
    settings = replace(settings, embedding_model=str(sage_dir), ranker_model=str(ranker_dir),
                       reembed_min_interval_ms=0)

    say("3. Fresh demo topics (prefix pymk-demo.)")
    delete_topics_with_prefix(settings, settings.topic_prefix + ".")
    # the worker's state belongs to the old topics (it records the offsets it applied from them)
    shutil.rmtree(settings.worker_dir / settings.app_id, ignore_errors=True)
    time.sleep(1.0)
    ensure_topics(settings)
    print(", ".join(settings.topic(k) for k in ("connections", "profile-views", "dismissals", "engagements",
                                                 "users", "recommendations", "dead-letter")))

    say("4. A stream worker (pymk worker)")
    log_path = settings.home / "demo-worker.log"
    log_path.unlink(missing_ok=True)
    worker = start_worker_process(settings, log_path)
    try:
        _wait_ready(settings, worker)
        print(f"worker pid {worker.pid}; debug HTTP on http://{settings.web_host}:{settings.web_port}; "
              f"log {log_path}")

        say(f"5. Replay {DATA.relative_to(DATA.parents[2])} with behaviour, and {len(BAD_MESSAGES)} bad messages")
        report = send_messages(settings, event_messages(settings, events), len(events))
        print(report.describe())
        bad = [(settings.topic("connections"), None, value) for value in BAD_MESSAGES]
        send_messages(settings, iter(bad), len(bad), progress=False)

        say("6. Waiting until the worker has processed every input and published every owed list")
        url = f"http://{settings.web_host}:{settings.web_port}"
        idle = wait_idle(settings, timeout_s=400, worker_urls=[url])
        stats = get_json(settings, "/stats")
        print("idle" if idle else "still busy after 400 s")
        refresh = stats["refresh"]
        print(f"{refresh['embedded']} embeddings computed, {refresh['refreshed']} lists published "
              f"({stats['index']['users']} users in the ANN index)")
        print("valid events processed per topic:")
        for kind, count in sorted(stats["events_valid"].items()):
            print(f"  {kind:<15} {count:>8}")
        print("dead letters per reason (each with the raw message, topic, partition and offset):")
        for reason, count in sorted(stats["dead_letters"].items()):
            print(f"  {reason:<18} {count:>5}")

        say("7. Feature state, read from the worker's RocksDB through the debug API")
        show_users(settings, events)

        say("8. Published recommendations with their reasons (GET /recommendations/{u}, pymk consume --user U)")
        for user in _busiest_users(events, 3):
            show_list(settings, user)
        print(why_the_lists(ranker_dir))
        print(f"A page per user to look at (list, reasons, feature rows, neighbourhood): "
              f"{url}/users/{_busiest_users(events, 1)[0]}/page")

        say("9. Live: a user connects with their first suggestion, then dismisses their new first one")
        show_live_change(settings, events)
    finally:
        stop_process(worker)

    say("10. Evaluation on the bundled graph (pymk evaluate --split time, offline mode, models trained on the past)")
    from pymk.evaluate import run_evaluation

    result, paths = run_evaluation(base, DATA, "time", Path("reports"), progress=False, two_tower=False)
    print(f"{'method':<18} {'Recall@20':>9} {'Recall@50':>9} {'MRR':>7}")
    for scores in result.methods:
        print(f"{scores.name:<18} {scores.recall[20]:>9.4f} {scores.recall[50]:>9.4f} {scores.mrr:>7.4f}")
    print("candidate coverage of the future pairs: " + ", ".join(f"{k} {v:.3f}" for k, v in result.coverage.items()))
    print(f"report {paths['md']} (and .json); Recall@K plot {paths['png']}")

    say(f"Done in {time.monotonic() - started:.0f} s. The broker keeps running (`pymk kafka stop` ends it).")
    print("Look around: PYMK_TOPIC_PREFIX=pymk-demo PYMK_APP_ID=pymk-demo-worker .venv/bin/pymk lag")
    return 0


def demo_models(settings: Settings, events: list) -> tuple[Path, Path]:
    """GraphSAGE and XGBoost trained on the demo's replay (connections, synthetic profiles and behaviour), cached
    under <home>/models/demo so a second `make demo` starts at once."""
    from pymk.evaluate import model_schema
    from pymk.index.training import EmbeddingTrainingConfig, train_embeddings
    from pymk.ranking.training_data import TrainingDataConfig, embeddings_at_checkpoint, train_ranker
    from pymk.train import connections_and_profiles

    cache = settings.model_dir / "demo"
    marker = cache / "models.json"
    if marker.exists():
        saved = json.loads(marker.read_text())
        if (saved.get("schema") == model_schema() and Path(saved["embeddings"], "metadata.json").exists()
                and Path(saved["ranker"], "metadata.json").exists()):
            print(f"cached: {saved['embeddings']}, {saved['ranker']}")
            return Path(saved["embeddings"]), Path(saved["ranker"])
    started = time.monotonic()
    connections, profiles = connections_and_profiles(events)
    sage = train_embeddings(connections, profiles, cache / "embeddings", EmbeddingTrainingConfig(progress=False))
    print(f"GraphSAGE {sage.metadata['version']}: validation AUC {sage.metadata.get('best_val_auc', 0):.3f} "
          f"({time.monotonic() - started:.0f} s); training curve {sage.curve_png}")
    ranker_dir = cache / "ranker"
    ranker = train_ranker(events, ranker_dir, TrainingDataConfig(), report=None,
                          embeddings_at=embeddings_at_checkpoint(sage.model_dir))
    top = sorted(ranker.feature_importances().items(), key=lambda kv: -kv[1])[:4]
    print(f"XGBoost {ranker.version}: validation AUC {ranker.metadata.get('val_auc', float('nan')):.3f}; "
          f"top features {', '.join(name for name, _ in top)} ({time.monotonic() - started:.0f} s in all)")
    marker.write_text(json.dumps({"embeddings": str(sage.model_dir), "ranker": str(ranker_dir),
                                  "schema": model_schema()}))
    return sage.model_dir, ranker_dir


def show_list(settings: Settings, user: int, limit: int = 5, mark: int | None = None) -> list[int]:
    published = get_json(settings, f"/recommendations/{user}")
    items = published["items"]
    print(f"user {user} — {len(items)} suggestions, model {published['model_version']}")
    for item in items[:limit]:
        reasons = item["reasons"]
        flag = "  <-- new" if mark is not None and item["candidate"] == mark else ""
        print(f"   {item['rank']:>2}. {item['candidate']:>5}  score {item['score']:.3f}  "
              f"[{'+'.join(item['sources'])}]  {reasons.get('text', '')}{flag}")
    return [item["candidate"] for item in items]


def why_the_lists(ranker_dir: Path) -> str:
    """One line on why the lists look as they do: what the served model leans on (its gain importances)."""
    from pymk.ranking.model import Ranker

    importances = Ranker.load(ranker_dir).feature_importances()
    total = sum(importances.values()) or 1.0
    top = sorted(importances.items(), key=lambda item: -item[1])[:3]
    named = ", ".join(f"{name} {100 * gain / total:.0f} %" for name, gain in top)
    activity = sum(gain for name, gain in importances.items() if "activity" in name or "days_since" in name)
    if activity / total >= 0.3:
        return (f"Why these lists: CollegeMsg is a messaging network, where who writes to whom next follows how active "
                f"people are more than mutual contacts, so the model ranks busy users high and one of them can top "
                f"several lists (its top features by gain: {named}).")
    return f"Why these lists: the model leans most on {named} (share of its gain)."


def _busiest_users(events: list, n: int) -> list[int]:
    from collections import Counter

    from pymk.events import ConnectionEvent

    degree: Counter[int] = Counter()
    for event in events:
        if isinstance(event, ConnectionEvent):
            degree[event.src] += 1
            degree[event.dst] += 1
    # well-connected but not the very top hubs: their lists are the interesting ones
    ranked = [u for u, _ in degree.most_common(60)]
    return ranked[20:20 + n]


def show_users(settings: Settings, events: list) -> None:
    for user in _busiest_users(events, 3):
        info = get_json(settings, f"/users/{user}")
        candidates = get_json(settings, f"/users/{user}/candidates")["candidates"]
        top = sorted(((c["common_neighbor_count"], c["adamic_adar_score"], int(v)) for v, c in candidates.items()
                      if not c["connected"]), reverse=True)[:5]
        profile = info["profile"] or {}
        print(f"user {user}: degree {info['degree']['value']}, {info['two_hop_candidates']} users within two hops, "
              f"works at {profile.get('company', '?')}, viewed {info['behaviour']['profiles_viewed']} profiles")
        for count, score, v in top:
            print(f"    candidate {v:>5}: {count:>3} mutual connections, Adamic-Adar {score:6.3f}")


def show_live_change(settings: Settings, events: list) -> None:
    from pymk.events import ConnectionEvent, DismissalEvent
    from pymk.streams.lag import wait_idle
    from pymk.streams.producer import event_messages, send_messages

    url = f"http://{settings.web_host}:{settings.web_port}"
    user = _busiest_users(events, 1)[0]
    before = get_json(settings, f"/recommendations/{user}")
    first = before["items"][0]["candidate"]
    features_before = get_json(settings, f"/features/{user}/{first}")["features"]
    ts = max(e.ts for e in events) + 1000
    print(f"{user} connects with {first} (their suggestion #1):")
    send_messages(settings, event_messages(settings, [ConnectionEvent(user, first, "add", ts)]), 1, progress=False)
    _wait_new_list(settings, user, before["generated_at"])
    wait_idle(settings, timeout_s=60, settle_s=0.5, worker_urls=[url])
    after = get_json(settings, f"/features/{user}/{first}")["features"]
    for name in ("graph_distance_bucket", "common_neighbor_count", "adamic_adar_score", "query_degree_log"):
        b, a = features_before[name]["value"], after[name]["value"]
        fmt = (lambda x: f"{x:.4f}") if isinstance(a, float) else str
        print(f"    {name:<26} {fmt(b):>10} -> {fmt(a):<10} (last changed at ts {after[name]['ts']})")
    refreshed = show_list(settings, user)
    print(f"   ({first} is now a connection: gone from the list; the list was re-ranked at once)"
          if first not in refreshed else "   (unexpected: still listed)")
    current = get_json(settings, f"/recommendations/{user}")
    # the one the user sees on top now (the list above), so that the dismissal's effect is visible
    second = current["items"][0]["candidate"]
    print(f"{user} dismisses {second} (their suggestion #1 now):")
    send_messages(settings, event_messages(settings, [DismissalEvent(user, second, ts + 1000)]), 1, progress=False)
    _wait_new_list(settings, user, current["generated_at"])
    after_dismissal = show_list(settings, user)
    print(f"   ({second} is gone from the list and will not be suggested again; the rest moved up)"
          if second not in after_dismissal else "   (unexpected: still listed)")


def _wait_new_list(settings: Settings, user: int, after_ms: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if get_json(settings, f"/recommendations/{user}")["generated_at"] > after_ms:
            return
        time.sleep(0.2)


def _wait_ready(settings: Settings, worker: subprocess.Popen[bytes], timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            raise SystemExit(f"the worker exited with code {worker.returncode}")
        try:
            if get_json(settings, "/health")["status"] == "ok":
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise SystemExit("the worker did not become ready")


if __name__ == "__main__":
    sys.exit(main())
