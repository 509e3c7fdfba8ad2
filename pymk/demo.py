"""`make demo`: the bundled real graph through the real broker and a real worker, end to end.

Starts the local Kafka broker, recreates the demo's own topics (prefix ``pymk-demo``, so the demo never
touches a user's ``pymk.*`` topics), starts a worker, replays CollegeMsg with behaviour plus a handful of
malformed messages, waits until every input is processed and prints what happened.
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
from pymk.processes import start_worker_process, stop_process
from pymk.settings import Settings

DATA = Path(__file__).resolve().parent.parent / "data" / "collegemsg" / "CollegeMsg.txt"
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
    status = LocalBroker(settings).start()
    print(status.describe())

    say("2. Fresh demo topics (prefix pymk-demo.)")
    delete_topics_with_prefix(settings, settings.topic_prefix + ".")
    # the worker's state belongs to the old topics (it records the offsets it applied from them)
    shutil.rmtree(settings.worker_dir / settings.app_id, ignore_errors=True)
    time.sleep(1.0)
    ensure_topics(settings)
    print(", ".join(settings.topic(k) for k in ("connections", "profile-views", "dismissals", "engagements",
                                                 "users", "recommendations", "dead-letter")))

    say("3. A stream worker (pymk worker)")
    log_path = settings.home / "demo-worker.log"
    log_path.unlink(missing_ok=True)
    worker = start_worker_process(settings, log_path)
    try:
        _wait_ready(settings, worker)
        print(f"worker pid {worker.pid}; debug HTTP on http://{settings.web_host}:{settings.web_port}; "
              f"log {log_path}")

        say(f"4. Replay {DATA.relative_to(DATA.parents[2])} with behaviour, and {len(BAD_MESSAGES)} bad messages")
        events = replay_events(DATA, behaviour=True, seed=settings.produce_seed)
        report = send_messages(settings, event_messages(settings, events), len(events))
        print(report.describe())
        bad = [(settings.topic("connections"), None, value) for value in BAD_MESSAGES]
        send_messages(settings, iter(bad), len(bad), progress=False)

        say("5. Waiting until the worker has processed every input")
        idle = wait_idle(settings, timeout_s=300)
        stats = get_json(settings, "/stats")
        print("idle" if idle else "still busy after 300 s")
        print("valid events processed per topic:")
        for kind, count in sorted(stats["events_valid"].items()):
            print(f"  {kind:<15} {count:>8}")
        print("dead letters per reason (each with the raw message, topic, partition and offset):")
        for reason, count in sorted(stats["dead_letters"].items()):
            print(f"  {reason:<18} {count:>5}")

        say("6. Feature state, read from the worker's RocksDB through the debug API")
        show_users(settings, events)

        say("7. A live change: a new connection, and the features that follow it")
        show_live_change(settings, events)
    finally:
        stop_process(worker)

    say(f"Done in {time.monotonic() - started:.0f} s. The broker keeps running (`pymk kafka stop` ends it).")
    print("Look around: PYMK_TOPIC_PREFIX=pymk-demo PYMK_APP_ID=pymk-demo-worker .venv/bin/pymk lag")
    return 0


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
    from pymk.events import ConnectionEvent
    from pymk.streams.lag import wait_idle
    from pymk.streams.producer import event_messages, send_messages

    user = _busiest_users(events, 1)[0]
    candidates = get_json(settings, f"/users/{user}/candidates")["candidates"]
    v = max((c["common_neighbor_count"], int(k)) for k, c in candidates.items() if not c["connected"])[1]
    before = get_json(settings, f"/features/{user}/{v}")["features"]
    ts = max(e.ts for e in events) + 1000
    send_messages(settings, event_messages(settings, [ConnectionEvent(user, v, "add", ts)]), 1, progress=False)
    wait_idle(settings, timeout_s=60, settle_s=0.5)
    after = get_json(settings, f"/features/{user}/{v}")["features"]
    print(f"{user} connects with {v}:")
    for name in ("graph_distance_bucket", "common_neighbor_count", "adamic_adar_score", "jaccard_sim",
                 "query_degree_log", "same_company_current", "co_engaged_with_content"):
        b, a = before[name]["value"], after[name]["value"]
        fmt = (lambda x: f"{x:.4f}") if isinstance(a, float) else str
        print(f"    {name:<26} {fmt(b):>10} -> {fmt(a):<10} (last changed at ts {after[name]['ts']})")


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
