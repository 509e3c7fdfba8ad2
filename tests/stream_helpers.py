"""Shared pieces of the tier-3 tests of embeddings and lists: a small synthetic network, sending events,
waiting for the workers, reading their answers."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import networkx as nx
from pymk.streams.consumer import latest_per_user, read_recommendations
from pymk.streams.lag import wait_idle
from pymk.streams.producer import event_messages, send_messages, synthetic_events
from workers import http_get

from pymk.events import ConnectionEvent, DismissalEvent, InputEvent, Recommendations, UserEvent
from pymk.settings import Settings


def small_network(n_users: int = 240, seed: int = 3) -> list[InputEvent]:
    return synthetic_events(n_users, seed=seed)


def send(settings: Settings, events: Sequence[InputEvent], rate: float | None = None) -> None:
    send_messages(settings, event_messages(settings, events), len(events), rate=rate, progress=False)


def worker_url(settings: Settings) -> str:
    return f"http://{settings.web_host}:{settings.web_port}"


def settle(settings: Settings, workers: Iterable[Settings], timeout_s: float = 300) -> None:
    """Every input processed and every owed embedding and list published by these workers."""
    assert wait_idle(settings, timeout_s=timeout_s, worker_urls=[worker_url(w) for w in workers]), \
        "the workers did not finish in time"


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
