"""How long Python's garbage collector stopped the worker, by generation (``/stats`` ``gc``).

The event loop is single-threaded: a collection of the oldest generation walks every tracked object (the row
caches hold millions) and blocks events, slices and flushes alike, so its pauses belong next to the flush
times when a list is late."""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class GenerationPauses:
    collections: int = 0
    seconds: float = 0.0
    max_seconds: float = 0.0


@dataclass
class GcPauses:
    by_generation: dict[int, GenerationPauses] = field(
        default_factory=lambda: {generation: GenerationPauses() for generation in range(3)})
    _started: float | None = None

    def install(self) -> None:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)

    def uninstall(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        if self._started is None:
            return
        seconds = time.perf_counter() - self._started
        self._started = None
        pauses = self.by_generation.setdefault(int(info.get("generation", 2)), GenerationPauses())
        pauses.collections += 1
        pauses.seconds += seconds
        pauses.max_seconds = max(pauses.max_seconds, seconds)

    def snapshot(self) -> dict[str, Any]:
        return {f"gen{g}": {"collections": p.collections, "ms": round(1000 * p.seconds, 1),
                            "max_ms": round(1000 * p.max_seconds, 1)} for g, p in sorted(self.by_generation.items())}
