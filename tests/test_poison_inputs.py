"""Tier 3 (real broker): the reproductions of the inputs and requests that used to stop a worker. Huge message keys
are dead-lettered (bounded) and a restart makes progress; the debug HTTP is read-only and answers 400/404 for ids
outside the contract or unknown users, and `pymk refresh --all` then publishes lists for known users only;
`pymk wait-idle` fails when the worker is dead; `pymk train ranker --from-stream` refuses thin data in one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

from kafka import KafkaProducer
from test_dead_letters import read_dead_letters

from pymk.events import DEAD_LETTER_KEY_BYTES, ConnectionEvent
from pymk.processes import start_worker_process, stop_process
from pymk.settings import Settings
from pymk.streams.producer import send_commands
from pymk.streams.topics import ensure_topics
from stream_helpers import latest_lists, send, settle, small_network, worker_url
from workers import http_get, metric_samples, running_worker, wait_until

POISON_KEYS = [b"k" * (2100 << 10), b"\x01" * (1 << 20), b"\xff" * (1536 << 10)]  # the reproductions


def big_producer(settings: Settings) -> KafkaProducer:
    return KafkaProducer(**settings.kafka_client_config(), max_request_size=8 << 20)


def degree(settings: Settings, user: int) -> int:
    return int(http_get(settings, f"/users/{user}")["degree"]["value"])


def test_huge_keys_are_dead_lettered_and_a_restart_makes_progress(kafka_settings: Settings, tmp_path: Path) -> None:
    settings = replace(kafka_settings, recommend=False)
    ensure_topics(settings)
    producer = big_producer(settings)
    topic = settings.topic("connections")
    now = 1_700_000_000_000
    for i, key in enumerate(POISON_KEYS):
        producer.send(topic, key=key, value=b"not json").get(timeout=60)
        producer.send(topic, key=b"10", value=ConnectionEvent(10, 100 + i, "add", now + i).to_json()).get(timeout=60)
    # a valid event with a 3 MiB key is applied (the key is not the event's user: it is forwarded by its src)
    producer.send(topic, key=b"7" * (3 << 20), value=ConnectionEvent(11, 12, "add", now).to_json()).get(timeout=60)
    log = tmp_path / "worker.log"
    with running_worker(settings, log) as proc:
        wait_until(lambda: degree(settings, 10) == 3 and degree(settings, 11) == 1, 120, what="valid events applied")
        letters = read_dead_letters(settings, len(POISON_KEYS))
        assert proc.poll() is None, f"the worker died (log {log})"
    assert sorted(letter.key_size for letter in letters) == sorted(len(key) for key in POISON_KEYS)
    for letter in letters:
        assert letter.reason.startswith("invalid_json") and letter.key_truncated and letter.raw == "not json"
        assert len(letter.record_key or b"") == DEAD_LETTER_KEY_BYTES

    # the restarted worker does not meet them again, and goes on with what comes next
    producer.send(topic, key=POISON_KEYS[0], value=b"not json either").get(timeout=60)
    producer.send(topic, key=b"10", value=ConnectionEvent(10, 200, "add", now + 10).to_json()).get(timeout=60)
    producer.close()
    with running_worker(settings, log) as proc:
        wait_until(lambda: degree(settings, 10) == 4, 120, what="the event after the restart applied")
        assert len(read_dead_letters(settings, len(POISON_KEYS) + 1)) == len(POISON_KEYS) + 1
        assert proc.poll() is None


def get_status(settings: Settings, path: str) -> tuple[int, dict]:
    import json

    url = f"http://{settings.web_host}:{settings.web_port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_the_debug_api_is_read_only_and_refresh_all_publishes_known_users_only(kafka_settings: Settings,
                                                                               tmp_path: Path) -> None:
    settings = kafka_settings
    ensure_topics(settings)
    events = small_network(120, seed=5)
    known = {u for e in events for u in (getattr(e, "src", None), getattr(e, "dst", None), getattr(e, "user", None))
             if u is not None}
    send(settings, events)
    with running_worker(settings, tmp_path / "worker.log") as proc:
        settle(settings, [settings])
        phantom = 777_777
        assert phantom not in known
        for path in (f"/users/{phantom}", f"/recommendations/{phantom}", f"/users/{phantom}/candidates",
                     f"/features/{phantom}/1", "/users/9223372036854775807"):
            status, body = get_status(settings, path)
            assert status == 404 and "unknown" in body["error"], (path, status, body)
        for path in ("/users/9223372036854775808", "/users/99999999999999999999999", "/users/%D9%A3",
                     "/users/-1", "/users/1e3", "/features/1/9223372036854775808", "/neighbours/18446744073709551616"):
            status, body = get_status(settings, path)
            assert status == 400 and "64-bit" in body["error"], (path, status, body)
        # ... and nothing was created: a refresh of every user publishes lists for the users events created only
        published_before = set(latest_lists(settings))
        asked_at = int(time.time() * 1000)
        send_commands(settings)

        def refreshed() -> dict | None:
            lists = latest_lists(settings)
            return lists if all(lists[u].generated_at >= asked_at for u in published_before) else None

        lists = wait_until(refreshed, 120, what="every list refreshed")
        settle(settings, [settings])
        assert phantom not in lists and 2**63 - 1 not in lists
        assert set(lists) <= known
        assert proc.poll() is None
        assert http_get(settings, "/health")["status"] == "ok"
        metrics = metric_samples(settings)
        assert metrics[("pymk_internal_errors_total", (("stage", "ranking"),))] == 0
        assert metrics[("pymk_list_refresh_seconds_count", ())] >= len(lists)
        assert http_get(settings, "/stats")["refresh"]["lists_owed"] == 0


def test_wait_idle_fails_when_the_worker_is_dead(kafka_settings: Settings, tmp_path: Path) -> None:
    settings = replace(kafka_settings, recommend=False)
    ensure_topics(settings)
    proc = start_worker_process(settings, tmp_path / "worker.log")
    try:
        wait_until(lambda: http_get(settings, "/health")["status"] == "ok", 90, what="worker ready")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        done = subprocess.run([sys.executable, "-m", "pymk.cli", "wait-idle", "--timeout", "60",
                               "--unreachable-grace", "2", "--worker", worker_url(settings)],
                              env={**os.environ, **settings.as_env()}, capture_output=True, text=True, timeout=120)
    finally:
        stop_process(proc)
    assert done.returncode == 2, done
    assert "does not answer" in done.stderr and "Traceback" not in done.stderr
    assert "idle" not in done.stdout


def test_training_from_a_stream_without_traffic_is_refused_in_one_line(kafka_settings: Settings) -> None:
    ensure_topics(kafka_settings)
    done = subprocess.run([sys.executable, "-m", "pymk.cli", "train", "ranker", "--from-stream"],
                          env={**os.environ, **kafka_settings.as_env()}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pymk train: no labelled impressions yet"), done.stderr
