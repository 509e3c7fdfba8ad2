"""Consumer lag of the worker group per topic, read from the broker (``pymk lag``, ``pymk wait-idle``)."""

from __future__ import annotations

import json
import time
import urllib.request
from collections import Counter

from kafka import KafkaConsumer, TopicPartition

from pymk.settings import INPUT_KINDS, Settings


def consumer_lag(settings: Settings, topics: list[str] | None = None) -> dict[str, int]:
    """Messages in each topic not yet committed by the worker group (end offset − committed offset)."""
    # The internal partition-messages topic counts too: features are final only once it is drained.
    topics = topics or [settings.topic(kind) for kind in (*INPUT_KINDS, "partition-messages", "commands")]
    # A consumer that names the group but never subscribes only reads its committed offsets.
    consumer = KafkaConsumer(**settings.kafka_client_config(), group_id=settings.app_id, client_id="pymk-lag",
                             enable_auto_commit=False)
    try:
        partitions = [TopicPartition(t, p) for t in topics for p in sorted(consumer.partitions_for_topic(t) or [])]
        end = consumer.end_offsets(partitions)
        lag: Counter[str] = Counter({t: 0 for t in topics})
        for tp in partitions:
            done = consumer.committed(tp) or 0
            lag[tp.topic] += max(0, end[tp] - done)
        return dict(lag)
    finally:
        consumer.close(autocommit=False)


# How long a worker just started may take to answer its first /health (callers that start workers pass it)
STARTUP_GRACE_S = 120.0


class WorkerUnreachable(RuntimeError):
    """A worker whose debug address does not answer (dead, or not started): nothing it owes can be known."""

    def __init__(self, url: str, why: str) -> None:
        super().__init__(f"the worker at {url} does not answer ({why}): it is dead or not started, so whether its "
                         "inputs are processed cannot be known")
        self.url = url


def pending_work(worker_urls: list[str]) -> int:
    """Users with an embedding or a list still owed, plus input messages not applied yet, summed over the
    workers' ``/health``; :class:`WorkerUnreachable` when one does not answer. The second part matters after a
    rebalance: a worker re-reading a partition that moved to it without its state is behind while the group's
    committed offsets are not."""
    total = 0
    for url in worker_urls:
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=5) as response:
                health = json.loads(response.read())
        except (OSError, ValueError) as exc:
            raise WorkerUnreachable(url, f"{type(exc).__name__}: {exc}") from exc
        total += int(health.get("pending_work", 0)) + int(health.get("input_backlog", 0))
    return total


def wait_idle(settings: Settings, timeout_s: float, settle_s: float = 1.0, topics: list[str] | None = None,
              worker_urls: list[str] | None = None, unreachable_grace_s: float = 10.0,
              startup_grace_s: float | None = None) -> bool:
    """Block until every input and every message between partitions is processed (lag 0, stable for
    ``settle_s``) and the given workers owe no embedding or list; False on timeout. A worker that does not answer
    is never idle: :class:`WorkerUnreachable` once it has not answered for ``unreachable_grace_s`` (a worker
    restarting answers again within it). ``startup_grace_s``: the longer grace until every worker has answered
    once, for a caller that has just started them (a worker imports torch, compiles or loads the tree evaluator
    and opens its state before it listens: over 10 s on a loaded 2-core machine, where a bench's warm-up stopped
    with this error)."""
    deadline = time.monotonic() + timeout_s
    idle_since: float | None = None
    unreachable_since: float | None = None
    answered = False
    while time.monotonic() < deadline:
        total = sum(consumer_lag(settings, topics).values())
        if worker_urls:
            try:
                total += pending_work(worker_urls)
                unreachable_since = None
                answered = True
            except WorkerUnreachable:
                unreachable_since = unreachable_since or time.monotonic()
                grace = (unreachable_grace_s if answered or startup_grace_s is None
                         else max(unreachable_grace_s, startup_grace_s))
                if time.monotonic() - unreachable_since >= grace:
                    raise
                total += 1
        now = time.monotonic()
        if total == 0:
            idle_since = idle_since or now
            if now - idle_since >= settle_s:
                return True
        else:
            idle_since = None
        time.sleep(0.5)
    return False
