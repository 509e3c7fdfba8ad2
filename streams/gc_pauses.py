"""How long Python's garbage collector stopped the worker, by generation (``/stats`` ``gc``), and how those
stops are kept short.

The event loop is single-threaded: a collection of the oldest generation walks every tracked object (the row
caches hold millions) and blocks events, slices and flushes alike. At 20 events/s on 3,000 users a worker made
one every ~13 s, of 260 ms on average and up to 340 ms: the largest stops of its event loop.

So after each full collection the survivors are frozen (``gc.freeze``): later collections walk only what was
made since. A frozen object is still freed when its last reference goes (reference counting), so what a
freeze keeps is only cyclic garbage among frozen objects; every ``unfreeze_interval_s`` the frozen objects go
back to the oldest generation, whose next collection walks them all once and frees such cycles."""

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
    unfreeze_interval_s: float | None = None  # None: never freeze
    unfreezes: int = 0
    _started: float | None = None
    _full_seen: int = 0
    _unfrozen_at: float = field(default_factory=time.monotonic)

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

    def tend(self, now: float | None = None) -> None:
        """Called on a timer, outside the collector: freeze what survived a full collection since the last call,
        and unfreeze everything once ``unfreeze_interval_s`` has passed."""
        if self.unfreeze_interval_s is None:
            return
        now = time.monotonic() if now is None else now
        if now - self._unfrozen_at >= self.unfreeze_interval_s:
            gc.unfreeze()
            self._unfrozen_at = now
            self.unfreezes += 1
            return
        full = self.by_generation[2].collections
        if full != self._full_seen:
            self._full_seen = full
            gc.freeze()  # O(1); counting the frozen objects walks them all, so only /stats does (snapshot)

    def snapshot(self) -> dict[str, Any]:
        out: dict[str, Any] = {f"gen{g}": {"collections": p.collections, "ms": round(1000 * p.seconds, 1),
                                           "max_ms": round(1000 * p.max_seconds, 1)}
                               for g, p in sorted(self.by_generation.items())}
        frozen = gc.get_freeze_count() if self.unfreeze_interval_s is not None else 0
        out.update(frozen_objects=frozen, unfreezes=self.unfreezes)
        return out
