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


def test_survivors_of_a_full_collection_are_frozen_and_unfrozen_after_the_interval() -> None:
    pauses = GcPauses(unfreeze_interval_s=600.0)
    pauses.install()
    try:
        pauses.tend(now=0.0)
        assert gc.get_freeze_count() == 0  # no full collection yet: nothing frozen
        gc.collect()
        pauses.tend(now=1.0)
        assert gc.get_freeze_count() > 0 and pauses.snapshot()["frozen_objects"] == gc.get_freeze_count()
        pauses._unfrozen_at = 0.0
        pauses.tend(now=700.0)
        assert gc.get_freeze_count() == 0 and pauses.snapshot()["unfreezes"] == 1
    finally:
        pauses.uninstall()
        gc.unfreeze()


def test_without_an_interval_nothing_is_frozen() -> None:
    pauses = GcPauses()
    pauses.install()
    try:
        gc.collect()
        pauses.tend()
        assert gc.get_freeze_count() == 0
    finally:
        pauses.uninstall()
