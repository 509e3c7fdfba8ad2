"""`pymk bench ingest`: a graph replayed through the real broker into one real worker, timed.

The events are produced first, then a fresh worker starts and the clock runs from its first processed event
until every input and every message between partitions is processed. In the same run, the raw rocksdict
WriteBatch put rate of this machine is measured as the reference the target is stated against.
"""

from __future__ import annotations

import json
import tempfile
import time
import urllib.request
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from pymk.datasets import load_edge_history
from pymk.events import ConnectionEvent
from pymk.processes import start_worker_process, stop_process
from pymk.settings import Settings


def raw_writebatch_put_rate(puts: int = 1_000_000, batch: int = 10_000) -> float:
    """Puts per second of 16-byte keys and 16-byte values through rocksdict WriteBatch, this machine."""
    from rocksdict import Options, Rdict, WriteBatch

    keys = np.random.default_rng(0).integers(0, 2**62, size=(puts, 2), dtype=np.uint64)
    with tempfile.TemporaryDirectory() as folder:
        db = Rdict(folder, Options(raw_mode=True))
        started = time.perf_counter()
        for start in range(0, puts, batch):
            wb = WriteBatch(raw_mode=True)
            for row in keys[start:start + batch]:
                raw = row.tobytes()
                wb.put(raw, raw)
            db.write(wb)
        elapsed = time.perf_counter() - started
        db.close()
    return puts / elapsed


def _get(settings: Settings, path: str) -> Any:
    with urllib.request.urlopen(f"http://{settings.web_host}:{settings.web_port}{path}", timeout=10) as response:
        return json.loads(response.read())


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bench_ingest(base: Settings, data: str | Path, timeout_s: float = 1800.0) -> dict[str, Any]:
    from pymk.kafka_broker import LocalBroker
    from pymk.streams.lag import consumer_lag
    from pymk.streams.producer import event_messages, send_messages
    from pymk.streams.topics import delete_topics_with_prefix, ensure_topics

    LocalBroker(base).start(quiet=True)
    raw_rate = raw_writebatch_put_rate()
    tag = "bench" + uuid.uuid4().hex[:8]
    home = Path(tempfile.mkdtemp(prefix="pymk-bench-"))
    # features only: the ingest figure is the exact feature maintenance (lists: `pymk bench freshness`)
    settings = replace(base, topic_prefix=tag, app_id=f"{tag}-worker", home=home, web_port=base.web_port + 17,
                       recommend=False)
    history = load_edge_history(data)
    events = [ConnectionEvent(u, v, "add", ts) for u, v, ts in history.connections]
    ensure_topics(settings)
    send_messages(settings, event_messages(settings, events), len(events), progress=False)

    log_path = home / "worker.log"
    worker = start_worker_process(settings, log_path)
    try:
        deadline = time.monotonic() + timeout_s
        first_seen: float | None = None
        while time.monotonic() < deadline:
            if worker.poll() is not None:
                raise RuntimeError(f"the worker exited ({worker.returncode}); see {log_path}")
            try:
                stats = _get(settings, "/stats")
            except OSError:
                time.sleep(0.2)
                continue
            done = sum(stats["events_valid"].values())
            if first_seen is None and done > 0:
                first_seen = time.monotonic()
            if done >= len(events) and sum(consumer_lag(settings).values()) == 0:
                break
            time.sleep(0.2)
        else:
            raise TimeoutError(f"not idle after {timeout_s} s")
        finished = time.monotonic()
        stats = _get(settings, "/stats")
        peak_rss = _peak_rss_mb(worker.pid)
    finally:
        stop_process(worker)
        delete_topics_with_prefix(settings, tag + ".")
    seconds = finished - (first_seen or finished)
    graph = stats["state"]["graph"]
    pair_updates = sum(g["pair_updates"] for g in graph.values())
    flush = stats["state"]["flush"]
    pair_rate = pair_updates / seconds if seconds > 0 else float("nan")
    return {
        "bench": "ingest",
        "data": str(data),
        "connection_events": len(events),
        "seconds": round(seconds, 2),
        "connection_events_per_s": round(len(events) / seconds, 1),
        "pair_feature_updates": pair_updates,
        "pair_feature_updates_per_s": round(pair_rate, 1),
        "mirror_register_changes": sum(g["mirror_changes"] for g in graph.values()),
        "messages_between_partitions": sum(g["messages_out"] for g in graph.values()),
        "kafka_messages_produced_by_worker": flush["messages_sent"],
        "rocksdb_rows_written": flush["rows_written"],
        "seconds_in_flush": round(flush["seconds"], 2),
        "worker_peak_rss_mb": round(peak_rss, 1),
        "raw_rocksdict_writebatch_puts_per_s": round(raw_rate, 1),
        "pair_updates_vs_raw_put_rate": round(pair_rate / raw_rate, 3),
        "target_pair_feature_updates_per_s": 200_000,
        "partitions": settings.partitions,
    }
