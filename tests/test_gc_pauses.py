"""The collector's pauses are counted by generation."""

from __future__ import annotations

import gc

from pymk.streams.gc_pauses import GcPauses


def test_a_full_collection_is_counted_with_its_pause() -> None:
    pauses = GcPauses()
    pauses.install()
    try:
        gc.collect()
        gc.collect()
    finally:
        pauses.uninstall()
    gen2 = pauses.snapshot()["gen2"]
    assert gen2["collections"] >= 2
    assert 0 <= gen2["max_ms"] <= gen2["ms"]
    gc.collect()  # uninstalled: no longer counted
    assert pauses.snapshot()["gen2"]["collections"] == gen2["collections"]
