"""Process-wide counters of a worker, rendered as Prometheus text for ``GET /metrics``."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# Upper bounds of the list-freshness histogram's buckets, seconds: from a list out within a slice between flushes
# to one that waited behind a backlog
REFRESH_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class Histogram:
    """A Prometheus histogram (cumulative buckets, sum, count) of one unlabelled series."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.bounds)

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                break
        self.total += value
        self.count += 1

    def render(self, name: str, help_text: str) -> list[str]:
        lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        cumulative = 0
        for bound, count in zip(self.bounds, self.counts, strict=True):
            cumulative += count
            lines.append(f'{name}_bucket{{le="{bound:g}"}} {cumulative}')
        lines += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.total:.6f}",
                  f"{name}_count {self.count}"]
        return lines


@dataclass
class WorkerMetrics:
    started_at: float = field(default_factory=time.time)
    events_valid: Counter[str] = field(default_factory=Counter)  # by input topic kind
    events_invalid: Counter[str] = field(default_factory=Counter)  # by input topic kind
    dead_letters: Counter[str] = field(default_factory=Counter)  # by reason code
    latency_sum_s: Counter[str] = field(default_factory=Counter)  # processing time by topic kind
    latency_count: Counter[str] = field(default_factory=Counter)

    def observe(self, kind: str, valid: bool, seconds: float, reason_code: str | None = None) -> None:
        (self.events_valid if valid else self.events_invalid)[kind] += 1
        if reason_code is not None:
            self.dead_letters[reason_code] += 1
        self.latency_sum_s[kind] += seconds
        self.latency_count[kind] += 1

    def snapshot(self) -> dict[str, dict[str, float]]:
        return {
            "events_valid": dict(self.events_valid),
            "events_invalid": dict(self.events_invalid),
            "dead_letters": dict(self.dead_letters),
        }

    def render(self, lag: dict[str, int] | None = None, internal_errors: Mapping[str, int] | None = None,
               refresh_delays: Histogram | None = None) -> str:
        """``internal_errors``: failures of the worker's own code by stage (streams/errors.py); each one is also a
        dead letter with reason ``internal_error``. ``refresh_delays``: event received → list ranked, seconds."""
        lines = [
            "# HELP pymk_events_processed_total Input events processed, by topic and outcome.",
            "# TYPE pymk_events_processed_total counter",
        ]
        for outcome, counter in (("valid", self.events_valid), ("invalid", self.events_invalid)):
            for kind, count in sorted(counter.items()):
                lines.append(f'pymk_events_processed_total{{topic="{_escape(kind)}",outcome="{outcome}"}} {count}')
        lines += ["# HELP pymk_dead_letters_total Messages sent to the dead-letter topic, by reason.",
                  "# TYPE pymk_dead_letters_total counter"]
        dead_letters = Counter(self.dead_letters)
        if internal_errors:
            dead_letters["internal_error"] += sum(internal_errors.values())
        for reason, count in sorted(dead_letters.items()):
            lines.append(f'pymk_dead_letters_total{{reason="{_escape(reason)}"}} {count}')
        lines += ["# HELP pymk_internal_errors_total Failures of the worker's own code, by stage (applying, "
                  "embedding, ranking, publishing); each was dead-lettered and processing went on.",
                  "# TYPE pymk_internal_errors_total counter"]
        for stage in ("applying", "embedding", "ranking", "publishing"):
            count = (internal_errors or {}).get(stage, 0)
            lines.append(f'pymk_internal_errors_total{{stage="{stage}"}} {count}')
        lines += ["# HELP pymk_processing_seconds Time spent processing input events, by topic.",
                  "# TYPE pymk_processing_seconds summary"]
        for kind in sorted(self.latency_count):
            lines.append(f'pymk_processing_seconds_sum{{topic="{_escape(kind)}"}} {self.latency_sum_s[kind]:.6f}')
            lines.append(f'pymk_processing_seconds_count{{topic="{_escape(kind)}"}} {self.latency_count[kind]}')
        if refresh_delays is not None:
            lines += refresh_delays.render("pymk_list_refresh_seconds", "From the first event a list answers (its "
                                           "receipt by the worker) to the list ranked and handed to the producer.")
        if lag is not None:
            lines += ["# HELP pymk_consumer_lag Messages not yet processed, by topic.",
                      "# TYPE pymk_consumer_lag gauge"]
            for topic, value in sorted(lag.items()):
                lines.append(f'pymk_consumer_lag{{topic="{_escape(topic)}"}} {value}')
        lines += ["# TYPE pymk_uptime_seconds gauge", f"pymk_uptime_seconds {time.time() - self.started_at:.1f}"]
        return "\n".join(lines) + "\n"
