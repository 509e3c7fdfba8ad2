"""A worker's metrics, kept and exposed by ``prometheus_client`` (``GET /metrics``, the text exposition format).

One :class:`~prometheus_client.CollectorRegistry` per worker object (not the library's global one), so that
several app objects in one process, as in tests, do not share counters. The names are pymk's since the first
release; scrapers and dashboards read them:

- ``pymk_events_processed_total{topic, outcome}``: input events by topic kind and ``valid``/``invalid``;
- ``pymk_dead_letters_total{reason}``: dead letters by reason code (``internal_error`` included);
- ``pymk_internal_errors_total{stage}``: failures of pymk's own code (streams/errors.py), by stage;
- ``pymk_processing_seconds{topic}``: time spent applying input events (summary: ``_sum``, ``_count``);
- ``pymk_list_refresh_seconds``: freshness, from the first event a list answers to the list ranked (histogram);
- ``pymk_consumer_lag{topic}``: the group's lag read from the broker at the scrape (gauge);
- ``pymk_uptime_seconds`` (gauge).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, Histogram, Summary, generate_latest
from prometheus_client import Counter as PromCounter

# Upper bounds of the list-freshness histogram's buckets, seconds: from a list out within a slice between flushes
# to one that waited behind a backlog
REFRESH_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
INTERNAL_ERROR_STAGES = ("applying", "embedding", "ranking", "publishing")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # the text exposition format's


class WorkerMetrics:
    """The worker's registry and its metrics; plain counters beside them for ``/stats``' JSON."""

    def __init__(self) -> None:
        self.started_at = time.time()
        self.registry = CollectorRegistry(auto_describe=True)
        self.events_processed = PromCounter("pymk_events_processed", "Input events processed, by topic and outcome.",
                                            ["topic", "outcome"], registry=self.registry)
        self.dead_letters_sent = PromCounter("pymk_dead_letters", "Messages sent to the dead-letter topic, by reason.",
                                             ["reason"], registry=self.registry)
        self.internal_errors = PromCounter("pymk_internal_errors", "Failures of the worker's own code, by stage "
                                           "(applying, embedding, ranking, publishing); each was dead-lettered "
                                           "and processing went on.", ["stage"], registry=self.registry)
        for stage in INTERNAL_ERROR_STAGES:
            self.internal_errors.labels(stage)  # present at 0 from the start: an alert can compare with it
        self.processing_seconds = Summary("pymk_processing_seconds", "Time spent processing input events, by topic.",
                                          ["topic"], registry=self.registry)
        self.list_refresh_seconds = Histogram("pymk_list_refresh_seconds", "From the first event a list answers "
                                              "(its receipt by the worker) to the list ranked and handed to the "
                                              "producer.", buckets=REFRESH_BUCKETS_S, registry=self.registry)
        self.consumer_lag = Gauge("pymk_consumer_lag", "Messages not yet processed, by topic (read from the broker "
                                  "at the scrape).", ["topic"], registry=self.registry)
        uptime = Gauge("pymk_uptime_seconds", "Seconds since the worker started.", registry=self.registry)
        uptime.set_function(lambda: time.time() - self.started_at)
        # for /stats (JSON): the same counts as plain numbers
        self.events_valid: Counter[str] = Counter()  # by input topic kind
        self.events_invalid: Counter[str] = Counter()
        self.dead_letters: Counter[str] = Counter()  # by reason code
        self._children: dict[tuple[str, bool], tuple[Any, Any]] = {}  # (kind, valid) → (counter, summary) children

    def observe(self, kind: str, valid: bool, seconds: float, reason_code: str | None = None) -> None:
        """One input event processed; ``reason_code``: it was dead-lettered for that reason. Called for every
        event: the labelled children are looked up once per label set (``labels()`` takes a lock and builds a key)."""
        (self.events_valid if valid else self.events_invalid)[kind] += 1
        children = self._children.get((kind, valid))
        if children is None:
            children = self._children[(kind, valid)] = (
                self.events_processed.labels(kind, "valid" if valid else "invalid"),
                self.processing_seconds.labels(kind))
        children[0].inc()
        children[1].observe(seconds)
        if reason_code is not None:
            self.dead_letter(reason_code)

    def dead_letter(self, reason_code: str) -> None:
        self.dead_letters[reason_code] += 1
        self.dead_letters_sent.labels(reason_code).inc()

    def internal_error(self, stage: str) -> None:
        """A failure of pymk's own code (streams/errors.py calls this): counted, and as a dead letter."""
        self.internal_errors.labels(stage).inc()
        self.dead_letter("internal_error")

    def snapshot(self) -> dict[str, dict[str, float]]:
        return {
            "events_valid": dict(self.events_valid),
            "events_invalid": dict(self.events_invalid),
            "dead_letters": dict(self.dead_letters),
        }

    def render(self, lag: Mapping[str, int] | None = None) -> bytes:
        """The text exposition of every metric; ``lag``: the group's lag per topic, just read from the broker."""
        if lag is not None:
            for topic, value in lag.items():
                self.consumer_lag.labels(topic).set(value)
        return generate_latest(self.registry)
