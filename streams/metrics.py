"""Process-wide counters of a worker, rendered as Prometheus text for ``GET /metrics``."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


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

    def render(self, lag: dict[str, int] | None = None, internal_errors: Mapping[str, int] | None = None) -> str:
        """``internal_errors``: failures of the worker's own code by stage (streams/errors.py); each one is also a
        dead letter with reason ``internal_error``."""
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
        if lag is not None:
            lines += ["# HELP pymk_consumer_lag Messages not yet processed, by topic.",
                      "# TYPE pymk_consumer_lag gauge"]
            for topic, value in sorted(lag.items()):
                lines.append(f'pymk_consumer_lag{{topic="{_escape(topic)}"}} {value}')
        lines += ["# TYPE pymk_uptime_seconds gauge", f"pymk_uptime_seconds {time.time() - self.started_at:.1f}"]
        return "\n".join(lines) + "\n"
