"""`pymk soak`: sustained load on one real worker, to see whether it keeps up and whether its memory levels off.

Synthetic events (every kind: sign-ups, connections and removals, views, dismissals, engagements) are produced
at a steady rate to a fresh topic prefix for the given minutes; when one generated network runs out the next
one follows with new user and item ids, so the load never turns into replays that merge into nothing. Every few
seconds the worker's resident memory (``VmRSS``), its CPU time and the group's consumer lag are sampled into a
CSV and, at the end, a PNG (RSS and lag over time). After the load the worker is given a short time to drain;
how long it takes is part of the answer.

Lag is "bounded" when the mean lag of the last third of the load is not above the middle third's by more than
a quarter plus two seconds of input (flush and commit cadence make lag jitter by about that much): a worker
that cannot keep up shows lag growing linearly, by (rate − capacity) per second.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import os
import shutil
import socket
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pymk.events import (
    ConnectionEvent,
    DismissalEvent,
    EngagementEvent,
    InputEvent,
    ProfileViewEvent,
    UserEvent,
    user_key,
)
from pymk.processes import start_worker_process, stop_process
from pymk.settings import Settings

CSV_FIELDS = ("t_s", "phase", "produced", "processed", "invalid", "lag_total", "lag_inputs", "lag_partition_messages",
              "rss_mb", "worker_cpu_percent", "users", "row_cache_mb", "rocksdb_mb", "rss_anon_mb",
              "rss_file_mb", "ann_index_mb",
              "rocksdb_table_readers_mb", "malloc_in_use_mb", "malloc_free_mb", "pymalloc_arenas_mb",
              "pymalloc_allocated_mb")


@dataclass(frozen=True)
class SoakSample:
    t_s: float  # since the load started
    phase: str  # "load" or "drain"
    produced: int  # acknowledged or in flight, cumulative
    processed: int | None  # input messages the worker has processed (its /stats), cumulative
    invalid: int | None  # of which dead-lettered (a soak of valid events must keep this at 0)
    lag_total: int | None  # every topic the group consumes: inputs, messages between partitions, commands
    lag_inputs: int | None
    lag_partition_messages: int | None
    rss_mb: float | None
    worker_cpu_percent: float | None  # since the previous sample; 100 = one core
    # memory that grows with users, not with events: the users the worker knows (user-globals), and the two
    # caches with a byte budget (PYMK_STATE_CACHE_MB, PYMK_ROCKSDB_MEMORY_MB)
    users: int | None = None
    row_cache_mb: float | None = None
    rocksdb_mb: float | None = None
    # where the rest is, to tell live data from allocator slack: RSS split into anonymous and file-backed
    # pages, the ANN index replica (FAISS codes and links, numpy copies), RocksDB table readers (outside its
    # cache), and glibc malloc's bytes in use and held free
    rss_anon_mb: float | None = None
    rss_file_mb: float | None = None
    ann_index_mb: float | None = None
    rocksdb_table_readers_mb: float | None = None
    malloc_in_use_mb: float | None = None
    malloc_free_mb: float | None = None
    pymalloc_arenas_mb: float | None = None  # Python's small objects: arenas mapped ...
    pymalloc_allocated_mb: float | None = None  # ... and the live objects in them


def shifted(event: InputEvent, offset: int) -> InputEvent:
    """The event with every user and item id moved by ``offset`` (a new, disjoint network per round)."""
    if isinstance(event, ConnectionEvent):
        return replace(event, src=event.src + offset, dst=event.dst + offset)
    if isinstance(event, ProfileViewEvent):
        return replace(event, viewer=event.viewer + offset, viewed=event.viewed + offset)
    if isinstance(event, DismissalEvent):
        return replace(event, user=event.user + offset, candidate=event.candidate + offset)
    if isinstance(event, EngagementEvent):
        return replace(event, user=event.user + offset, item=event.item + offset)
    if isinstance(event, UserEvent):
        return replace(event, user=event.user + offset)
    raise TypeError(f"unknown event {event!r}")


def endless_events(users: int, seed: int, same_users: bool = False) -> Iterator[InputEvent]:
    """Synthetic networks of ``users`` users one after another, ids shifted by ``users`` per round. The next
    round is generated in the background while the current one is sent (~1 s per 10,000 users).
    ``same_users``: every round is a new network over the *same* ids, its times moved past the previous round's
    (new connections, removals, views and profile edits of a fixed population), and it removes, spread evenly
    through it, the connections the previous round left that it does not make again: the graph stays the size
    of one network, as in a mature network whose churn balances its growth. That is the load under which
    memory and lag must level off; without the removals every round would densify the same users' graph, and
    per-event work (2-hop pairs touched) would grow without end."""
    from pymk.streams.producer import synthetic_events

    last_ts = [0]
    previous_edges: list[set[tuple[int, int]]] = [set()]

    def generate(round_index: int, out: list[list[InputEvent]]) -> None:
        events = synthetic_events(users, seed=seed + round_index)
        if round_index == 0:
            out.append(events)
            previous_edges[0] = _final_edges(events) if same_users else set()
        elif same_users:
            offset = last_ts[0] + 1 - min(e.ts for e in events)
            moved = [replace(e, ts=e.ts + offset) for e in events]
            edges = _final_edges(moved)  # also what the round leaves: the removals only take what it does not make
            out.append(_replacing(moved, previous_edges[0] - edges))
            previous_edges[0] = edges
        else:
            out.append([shifted(e, round_index * users) for e in events])
        last_ts[0] = max(e.ts for e in out[-1])

    round_index = 0
    current: list[list[InputEvent]] = []
    generate(0, current)
    while True:
        upcoming: list[list[InputEvent]] = []
        worker = threading.Thread(target=generate, args=(round_index + 1, upcoming), daemon=True)
        worker.start()
        yield from current[0]
        worker.join()
        current, round_index = upcoming, round_index + 1


def _final_edges(events: Sequence[InputEvent]) -> set[tuple[int, int]]:
    """The connections a stream of events leaves (adds and removes in order), as (low, high) pairs."""
    edges: set[tuple[int, int]] = set()
    for event in events:
        if isinstance(event, ConnectionEvent):
            pair = (min(event.src, event.dst), max(event.src, event.dst))
            if event.action == "add":
                edges.add(pair)
            else:
                edges.discard(pair)
    return edges


def _replacing(events: list[InputEvent], stale: set[tuple[int, int]]) -> list[InputEvent]:
    """``events`` with a removal of every ``stale`` connection, spread evenly through them (each at the time of
    the event it follows, so times stay in order)."""
    if not stale or not events:
        return events
    removals = sorted(stale)
    every = len(events) / len(removals)
    out: list[InputEvent] = []
    next_removal = 0
    for index, event in enumerate(events):
        out.append(event)
        while next_removal < len(removals) and next_removal * every <= index:
            low, high = removals[next_removal]
            out.append(ConnectionEvent(low, high, "remove", event.ts))
            next_removal += 1
    return out


class _PacedProducer(threading.Thread):
    """Sends events at ``rate`` per second until stopped; counts what it sent.

    Each event is stamped with the wall clock when it is sent (never earlier than the one before, so the
    stream's order and its last-writer-wins outcome are the generator's). The generator's own times run ~90 days
    per round: replayed at soak speed they passed the workers' future limit after ~12 rounds (50 minutes at
    150 events/s), and every later event was a dead letter."""

    def __init__(self, settings: Settings, rate: float, users: int, seed: int, same_users: bool = False) -> None:
        super().__init__(daemon=True, name="soak-producer")
        self.settings, self.rate, self.users, self.seed = settings, rate, users, seed
        self.same_users = same_users
        self.sent = 0
        self.stop_requested = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        from pymk.streams.producer import make_producer

        try:
            producer = make_producer(self.settings, client_id="pymk-soak")
            events = endless_events(self.users, self.seed, self.same_users)
            started = time.monotonic()
            last_ts = 0
            while not self.stop_requested.is_set():
                due = int((time.monotonic() - started) * self.rate)
                while self.sent < due:
                    last_ts = max(last_ts, int(time.time() * 1000))
                    event = replace(next(events), ts=last_ts)
                    producer.send(self.settings.topic(event.KIND), key=user_key(event.key), value=event.to_json())
                    self.sent += 1
                time.sleep(0.005)
            producer.flush(timeout=60)
            producer.close(timeout=10)
        except BaseException as exc:  # noqa: BLE001 - reported by run_soak
            self.error = exc


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rss_mb(pid: int, field: str = "VmRSS") -> float | None:
    """A resident-memory line of /proc/<pid>/status in MB: VmRSS, or its parts RssAnon (heap, stacks,
    anonymous mmaps) and RssFile (mapped files: mostly the code of torch, FAISS, XGBoost, RocksDB)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _worker_page(settings: Settings, path: str) -> dict[str, Any] | None:
    import json

    try:
        with urllib.request.urlopen(f"http://{settings.web_host}:{settings.web_port}{path}", timeout=10) as response:
            return dict(json.loads(response.read()))
    except (OSError, ValueError):
        return None


def _processed(stats: dict[str, Any] | None) -> int | None:
    """Input messages the worker has processed, from its /stats."""
    return None if stats is None else sum(stats["events_valid"].values()) + sum(stats["events_invalid"].values())


def _mb(value: float | None) -> float | None:
    return None if value is None else round(value / 2**20, 1)


def _memory_parts(settings: Settings, stats: dict[str, Any] | None) -> dict[str, Any]:
    """The memory fields of a SoakSample, from the worker's /stats and /memory."""
    memory = _worker_page(settings, "/memory?pymalloc=1")
    parts: dict[str, Any] = {"users": None if stats is None else int(stats["globals_users"])}
    if memory is None:
        return parts
    ann = memory.get("ann_index_bytes") or {}
    malloc = memory.get("malloc_bytes") or {}
    pymalloc = memory.get("pymalloc_bytes") or {}
    parts.update(row_cache_mb=_mb(memory["row_cache_bytes"]), rocksdb_mb=_mb(memory.get("rocksdb_memory_bytes")),
                 ann_index_mb=_mb(sum(v for k, v in ann.items() if k != "slots") if ann else None),
                 rocksdb_table_readers_mb=_mb((memory.get("rocksdb_properties_bytes") or {}).get("table_readers")),
                 malloc_in_use_mb=_mb(malloc.get("in_use")), malloc_free_mb=_mb(malloc.get("free_in_arenas")),
                 pymalloc_arenas_mb=_mb(pymalloc.get("arenas")),
                 pymalloc_allocated_mb=_mb(pymalloc.get("allocated_blocks")))
    return parts


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _slope_per_s(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (t, y)."""
    if len(points) < 2:
        return None
    mean_t = sum(t for t, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    spread = sum((t - mean_t) ** 2 for t, _ in points)
    return sum((t - mean_t) * (y - mean_y) for t, y in points) / spread if spread else None


def _per_minute(per_second: float | None) -> float | None:
    return per_second * 60 if per_second is not None else None


def summarise(samples: list[SoakSample], rate: float, load_s: float) -> dict[str, Any]:
    """Figures of a run from its samples."""
    load = [s for s in samples if s.phase == "load"]
    middle = [s for s in load if load_s / 3 <= s.t_s < 2 * load_s / 3]
    last = [s for s in load if s.t_s >= 2 * load_s / 3]
    lags = [(s.t_s, float(s.lag_total)) for s in load if s.lag_total is not None]
    rss = [(s.t_s, s.rss_mb) for s in load if s.rss_mb is not None]
    lag_middle = _mean([float(s.lag_total) for s in middle if s.lag_total is not None])
    lag_last = _mean([float(s.lag_total) for s in last if s.lag_total is not None])
    rss_middle = _mean([s.rss_mb for s in middle if s.rss_mb is not None])
    rss_last = _mean([s.rss_mb for s in last if s.rss_mb is not None])
    bounded = (lag_middle is not None and lag_last is not None
               and lag_last <= 1.25 * lag_middle + 2.0 * rate)
    # RSS levels off when the last third averages within 5 % of the middle third. A run that brings new users
    # all the time fails this by design (each worker holds some state per user): its per-user figures say why.
    rss_bounded = rss_middle is not None and rss_last is not None and rss_last <= 1.05 * rss_middle
    processed = [(s.t_s, s.processed) for s in load if s.processed is not None]
    cpu = [s.worker_cpu_percent for s in load if s.worker_cpu_percent is not None]
    tail = [(t, y) for t, y in lags if t >= load_s / 3]
    return {
        "lag_max": max((y for _, y in lags), default=None),
        "lag_last": lags[-1][1] if lags else None,
        "lag_middle_third_mean": lag_middle,
        "lag_last_third_mean": lag_last,
        "lag_slope_per_s_last_two_thirds": _slope_per_s(tail),
        "lag_bounded": bounded,
        "rss_mb_max": max((y for _, y in rss), default=None),
        "rss_mb_last": rss[-1][1] if rss else None,
        "rss_growth_mb_last_vs_middle_third": (rss_last - rss_middle) if rss_last and rss_middle else None,
        "rss_bounded": rss_bounded,
        "rss_slope_mb_per_min_last_two_thirds": _per_minute(_slope_per_s([(t, y) for t, y in rss if t >= load_s / 3])),
        "processing_rate_per_s": ((processed[-1][1] - processed[0][1]) / (processed[-1][0] - processed[0][0])
                                  if len(processed) > 1 and processed[-1][0] > processed[0][0] else None),
        "worker_cpu_percent_mean": _mean(cpu),
        **_memory_per_user(load, load_s),
    }


def _memory_per_user(load: list[SoakSample], load_s: float) -> dict[str, Any]:
    """Whether RSS grows with events or with users: the soak's networks bring new users all the time, and each
    worker holds some state per user (its replica of the global ANN index, user-globals, caches of profiles), so
    RSS keeps rising with users even when the byte-bounded caches have levelled off. Over the last two thirds:
    RSS growth per 1,000 new users, and the same without the two bounded caches."""
    tail = [s for s in load if s.t_s >= load_s / 3 and s.users is not None and s.rss_mb is not None]
    users = [s.users for s in load if s.users is not None]
    out: dict[str, Any] = {"users_last": users[-1] if users else None,
                           "row_cache_mb_max": max((s.row_cache_mb for s in load if s.row_cache_mb is not None),
                                                   default=None),
                           "rocksdb_mb_max": max((s.rocksdb_mb for s in load if s.rocksdb_mb is not None),
                                                 default=None)}

    def unbounded(sample: SoakSample) -> float:
        return (sample.rss_mb or 0.0) - (sample.row_cache_mb or 0.0) - (sample.rocksdb_mb or 0.0)

    # RSS without the two byte-bounded caches (which fill up to their budgets): with a fixed population
    # (--same-users) this is what has to level off
    thirds = [[unbounded(s) for s in load if lo * load_s / 3 <= s.t_s < hi * load_s / 3 and s.rss_mb is not None]
              for lo, hi in ((1, 2), (2, 3.01))]
    out["rss_outside_bounded_caches_mb_middle_third_mean"] = _mean(thirds[0])
    out["rss_outside_bounded_caches_mb_last_third_mean"] = _mean(thirds[1])
    out["rss_outside_bounded_caches_slope_mb_per_min_last_two_thirds"] = _per_minute(
        _slope_per_s([(s.t_s, unbounded(s)) for s in tail]))
    # the parts beside it, middle → last third, so a growth outside the caches can be attributed
    out["memory_parts_mb_middle_and_last_third_mean"] = {
        name: [_mean([getattr(s, name) for s in load if lo * load_s / 3 <= s.t_s < hi * load_s / 3
                      and getattr(s, name) is not None]) for lo, hi in ((1, 2), (2, 3.01))]
        for name in ("rss_anon_mb", "rss_file_mb", "ann_index_mb", "rocksdb_table_readers_mb", "malloc_in_use_mb",
                     "malloc_free_mb", "pymalloc_arenas_mb", "pymalloc_allocated_mb")}
    if len(tail) < 2 or (tail[-1].users or 0) < 1.1 * (tail[0].users or 0):
        return out  # (almost) no new users: a per-user figure would divide by noise (e.g. --same-users)
    new_users = (tail[-1].users or 0) - (tail[0].users or 0)

    out["rss_mb_per_1000_new_users_last_two_thirds"] = round(
        1000 * ((tail[-1].rss_mb or 0.0) - (tail[0].rss_mb or 0.0)) / new_users, 2)
    out["rss_outside_bounded_caches_mb_per_1000_new_users"] = round(
        1000 * (unbounded(tail[-1]) - unbounded(tail[0])) / new_users, 2)
    return out


def plot(samples: list[SoakSample], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_rss, ax_lag) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    rss = [(s.t_s, s.rss_mb) for s in samples if s.rss_mb is not None]
    ax_rss.plot([t for t, _ in rss], [y for _, y in rss], color="tab:blue")
    ax_rss.set_ylabel("worker RSS (MB)")
    for label, attribute in (("total", "lag_total"), ("inputs", "lag_inputs"),
                             ("partition-messages", "lag_partition_messages")):
        points = [(s.t_s, getattr(s, attribute)) for s in samples if getattr(s, attribute) is not None]
        ax_lag.plot([t for t, _ in points], [y for _, y in points], label=label)
    ax_lag.set_ylabel("consumer lag (messages)")
    ax_lag.set_xlabel("seconds since the load started")
    ax_lag.legend(loc="upper left")
    drain = [s.t_s for s in samples if s.phase == "drain"]
    for axis in (ax_rss, ax_lag):
        axis.grid(alpha=0.3)
        if drain:
            axis.axvline(drain[0], color="grey", linestyle="--", linewidth=1)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_soak(settings: Settings, rate: float, minutes: float, out_dir: Path, users: int,
             sample_interval_s: float = 5.0, drain_timeout_s: float = 120.0, seed: int = 7,
             same_users: bool = False) -> dict[str, Any]:
    """Produce synthetic events at ``rate`` per second for ``minutes`` into one fresh worker (topics under a new
    prefix, state in a temporary folder, both removed afterwards); sample RSS and lag every
    ``sample_interval_s``; write ``soak-<rate>.csv`` and ``.png`` to ``out_dir``; return the summary.
    ``settings.recommend`` decides whether the worker also embeds and publishes lists."""
    from pymk.kafka_broker import LocalBroker
    from pymk.streams.lag import consumer_lag
    from pymk.streams.topics import delete_topics_with_prefix, ensure_topics

    if rate <= 0 or minutes <= 0 or users < 2:
        raise ValueError("rate and minutes must be positive and users at least 2")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    local = LocalBroker(settings)
    if not settings.bootstrap_servers and not local.accepting():
        local.start(quiet=True)
    tag = "soak" + uuid.uuid4().hex[:8]
    state_home = Path(tempfile.mkdtemp(prefix="pymk-soak-"))
    run = replace(settings, topic_prefix=tag, app_id=f"{tag}-worker", home=state_home, web_port=_free_port())
    name = f"soak-{rate:g}"
    csv_path, png_path, log_path = out_dir / f"{name}.csv", out_dir / f"{name}.png", out_dir / f"{name}-worker.log"
    ensure_topics(run)
    load_average_before = os.getloadavg()[0]  # the machine may be shared: context for the figures
    worker = start_worker_process(run, log_path)
    samples: list[SoakSample] = []
    producer = _PacedProducer(run, rate, users, seed, same_users)
    load_s = minutes * 60.0
    drain_s: float | None = None
    try:
        deadline = time.monotonic() + 180
        while _worker_page(run, "/stats") is None:
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not start; see {log_path}")
            time.sleep(0.5)
        input_topics = set(run.input_topics.values())
        messages_topic = run.topic("partition-messages")
        with open(csv_path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
            writer.writeheader()
            producer.start()
            started = time.monotonic()
            cpu_before, cpu_at = _cpu_seconds(worker.pid), started
            phase, load_ended = "load", None
            while True:
                now = time.monotonic()
                if phase == "load" and now - started >= load_s:
                    producer.stop_requested.set()
                    producer.join(timeout=90)
                    phase, load_ended = "drain", time.monotonic()
                try:
                    lag = consumer_lag(run)
                except Exception:  # noqa: BLE001 - a missed sample, not a failed run
                    lag = None
                cpu_now, cpu_time = _cpu_seconds(worker.pid), time.monotonic()
                cpu_percent = (100.0 * (cpu_now - cpu_before) / (cpu_time - cpu_at)
                               if cpu_now is not None and cpu_before is not None and cpu_time > cpu_at else None)
                cpu_before, cpu_at = cpu_now, cpu_time
                stats = _worker_page(run, "/stats")
                memory_parts = _memory_parts(run, stats)
                sample = SoakSample(
                    t_s=round(time.monotonic() - started, 2), phase=phase, produced=producer.sent,
                    processed=_processed(stats),
                    invalid=None if stats is None else sum(stats["events_invalid"].values()),
                    lag_total=sum(lag.values()) if lag is not None else None,
                    lag_inputs=sum(v for t, v in lag.items() if t in input_topics) if lag is not None else None,
                    lag_partition_messages=lag.get(messages_topic) if lag is not None else None,
                    rss_mb=_rss_mb(worker.pid), rss_anon_mb=_rss_mb(worker.pid, "RssAnon"),
                    rss_file_mb=_rss_mb(worker.pid, "RssFile"),
                    worker_cpu_percent=round(cpu_percent, 1) if cpu_percent is not None else None,
                    **memory_parts)
                samples.append(sample)
                writer.writerow(dataclasses.asdict(sample))
                handle.flush()
                if worker.poll() is not None or producer.error is not None:
                    break
                if phase == "drain" and load_ended is not None:
                    if sample.lag_total == 0:
                        drain_s = round(time.monotonic() - load_ended, 1)
                        break
                    if time.monotonic() - load_ended > drain_timeout_s:
                        break
                time.sleep(max(0.0, sample_interval_s - (time.monotonic() - now)))
        worker_alive = worker.poll() is None
        load_average_after = os.getloadavg()[0]
    finally:
        producer.stop_requested.set()
        stop_process(worker)
        with contextlib.suppress(Exception):  # cleaning up must not hide the run's outcome
            delete_topics_with_prefix(run, tag)
        shutil.rmtree(state_home, ignore_errors=True)
    if producer.error is not None:
        raise RuntimeError(f"producing failed: {producer.error!r}") from producer.error
    plot(samples, png_path, f"pymk soak: {rate:g} events/s for {minutes:g} min, {users} users per network"
                            + (" (the same users every round)" if same_users else ""))
    load_samples = [s for s in samples if s.phase == "load"]
    return {
        "bench": "soak",
        "rate_target_per_s": rate,
        "minutes": minutes,
        "users_per_network": users,
        "same_users_every_round": same_users,
        "recommend": settings.recommend,
        "partitions": settings.partitions,
        "produced": producer.sent,
        "produce_rate_per_s": round(producer.sent / load_s, 1),
        "processed": next((s.processed for s in reversed(samples) if s.processed is not None), None),
        "invalid": next((s.invalid for s in reversed(samples) if s.invalid is not None), None),
        **summarise(samples, rate, load_s),
        "drain_s": drain_s,  # None: not drained within drain_timeout_s
        "worker_alive_at_end": worker_alive,
        "machine_load_average_1m": [round(load_average_before, 2), round(load_average_after, 2)],
        "cpu_count": os.cpu_count(),
        "samples": len(load_samples),
        "csv": str(csv_path),
        "png": str(png_path),
        "worker_log": str(log_path),
    }
