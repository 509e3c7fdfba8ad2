"""Shared pieces of the tier-3 tests of embeddings and lists: a small synthetic network, sending events,
waiting for the workers, reading their answers."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import networkx as nx

from pymk.events import ConnectionEvent, DismissalEvent, InputEvent, Recommendations, UserEvent
from pymk.settings import Settings
from pymk.streams.consumer import latest_per_user, read_recommendations
from pymk.streams.lag import consumer_lag, wait_idle
from pymk.streams.producer import event_messages, send_messages, synthetic_events
from workers import http_get, wait_until


def small_network(n_users: int = 240, seed: int = 3) -> list[InputEvent]:
    return synthetic_events(n_users, seed=seed)


def send(settings: Settings, events: Sequence[InputEvent], rate: float | None = None) -> None:
    send_messages(settings, event_messages(settings, events), len(events), rate=rate, progress=False)


def worker_url(settings: Settings) -> str:
    return f"http://{settings.web_host}:{settings.web_port}"


def settle(settings: Settings, workers: Iterable[Settings], timeout_s: float = 300) -> None:
    """Every input processed and every owed embedding and list published by these workers."""
    workers = list(workers)
    if not wait_idle(settings, timeout_s=timeout_s, worker_urls=[worker_url(w) for w in workers]):
        raise AssertionError(f"the workers did not finish in {timeout_s:.0f} s: {still_busy(settings, workers)}")


def still_busy(settings: Settings, workers: Iterable[Settings]) -> dict[str, Any]:
    """What a settle was still waiting for: lag per topic and each worker's /health (a readable failure)."""
    out: dict[str, Any] = {"lag": {t: n for t, n in consumer_lag(settings).items() if n}}
    for worker in workers:
        try:
            out[worker_url(worker)] = http_get(worker, "/health")
        except Exception as error:  # noqa: BLE001 - a dead worker is part of the answer
            out[worker_url(worker)] = repr(error)
    return out


def final_graph(events: Iterable[InputEvent]) -> nx.Graph:
    """The graph after the events, by last-writer-wins per pair in ts order (the workers' semantics)."""
    last: dict[tuple[int, int], tuple[int, str]] = {}
    for event in events:
        if isinstance(event, ConnectionEvent):
            pair = (min(event.src, event.dst), max(event.src, event.dst))
            version = (event.ts, event.action == "remove")
            if pair not in last or version >= (last[pair][0], last[pair][1] == "remove"):
                last[pair] = (event.ts, event.action)
    graph = nx.Graph()
    graph.add_edges_from(pair for pair, (_, action) in last.items() if action == "add")
    return graph


def dismissals(events: Iterable[InputEvent]) -> dict[int, set[int]]:
    out: dict[int, set[int]] = {}
    for event in events:
        if isinstance(event, DismissalEvent):
            out.setdefault(event.user, set()).add(event.candidate)
    return out


def users_of(events: Iterable[InputEvent]) -> set[int]:
    out: set[int] = set()
    for event in events:
        if isinstance(event, ConnectionEvent):
            out.update((event.src, event.dst))
        elif isinstance(event, UserEvent):
            out.add(event.user)
    return out


def latest_lists(settings: Settings) -> dict[int, Recommendations]:
    return latest_per_user(read_recommendations(settings))


def neighbours(settings: Settings, user: int, k: int = 10, vector: bool = False) -> dict[str, Any]:
    return http_get(settings, f"/neighbours/{user}?k={k}" + ("&vector=1" if vector else ""))


def end_offsets(settings: Settings, kind: str) -> dict[int, int]:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(**settings.kafka_client_config(), group_id=None, enable_auto_commit=False)
    try:
        topic = settings.topic(kind)
        ends = consumer.end_offsets([TopicPartition(topic, p) for p in range(settings.partitions)])
        return {tp.partition: end for tp, end in ends.items()}
    finally:
        consumer.close()


def wait_tables_read(settings: Settings, workers: Sequence[Settings], timeout_s: float = 60) -> None:
    """Every worker has read the embeddings and user-globals topics up to their current end (what other
    workers published: vectors, degrees, profiles, activity), so what it ranks next does not depend on
    how fast it reads them."""
    ends = {"embeddings": end_offsets(settings, "embeddings"), "user-globals": end_offsets(settings, "user-globals")}

    def read_all(worker: Settings) -> bool:
        stats = http_get(worker, "/stats")
        read = {"embeddings": stats["index"]["offsets"], "user-globals": stats["globals_offsets"]}
        return all(read[kind].get(str(p), 0) >= end for kind in ends for p, end in ends[kind].items())

    wait_until(lambda: all(read_all(worker) for worker in workers), timeout_s,
               what="every worker read the table topics to their end")


def final_refresh(settings: Settings, workers: Sequence[Settings]) -> None:
    """Re-embed every user from the final state, then rank every list against that final index.

    Two commands, each settled, because a command reaches the partitions one by one: ranking in the same pass
    as the re-embedding would rank some users against other users' older vectors, which depend on timing.
    Before each, every worker has read what the others published (degrees and profiles for the embedder,
    vectors and activity for ranking)."""
    from pymk.streams.producer import send_commands

    settle(settings, workers)
    wait_tables_read(settings, workers)
    send_commands(settings, reembed=True, rank=False)
    settle(settings, workers)
    wait_tables_read(settings, workers)
    send_commands(settings)
    settle(settings, workers)


def list_content(recs: Recommendations) -> dict[str, Any]:
    """A published list without its wall-clock publication time: what was ranked, as of the event time."""
    body = recs.to_dict()
    del body["generated_at"]
    return body


def state_view(via: Sequence[Settings], users: Iterable[int]) -> dict[int, dict[str, Any]]:
    """Per user, what the workers hold, read through the debug API (queries alternate between ``via``, so
    some are routed to the owner): features, the index entry and vector, the last published list. Wall-clock
    fields (embedding computation times, publication times) and version counters are left out: they count
    how often the work was done, not what it produced."""
    out: dict[int, dict[str, Any]] = {}
    for index, user in enumerate(sorted(users)):
        worker = via[index % len(via)]
        body = http_get(worker, f"/users/{user}")
        embedding = body.pop("embedding")
        body.pop("last_recommendation")
        body.pop("pending_work")
        body.pop("partition")
        # k as large as Stage 1's: on these small graphs the search returns every indexed user with its exact
        # cosine, which is what lists are built from; a small k would compare HNSW's approximation, whose
        # misses depend on the order vectors were inserted in (a restart re-inserts them in another)
        found = neighbours(worker, user, k=1000, vector=True)
        recs = http_get(worker, f"/recommendations/{user}")
        body.update(
            candidates=http_get(worker, f"/users/{user}/candidates")["candidates"],
            has_embedding_row=embedding is not None,
            in_index=found["embedding"] is not None,
            vector=found.get("vector"),
            ann=[(x["user"], x["cosine"]) for x in found["neighbours"]],
            list=None if recs["generated_at"] is None else list_content(Recommendations.from_json(json.dumps(recs))),
        )
        out[user] = body
    return out


def differences(expected: dict[int, dict[str, Any]], got: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Per field, how many users differ, and the first such user (a readable failure instead of a dump)."""
    out: dict[str, Any] = {}
    for user in sorted(expected.keys() | got.keys()):
        want, have = expected.get(user, {}), got.get(user, {})
        for field in sorted(want.keys() | have.keys()):
            if want.get(field) != have.get(field):
                entry = out.setdefault(field, {"users": 0, "first": user})
                entry["users"] += 1
    return out
