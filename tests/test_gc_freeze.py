"""Start-up objects leave the garbage collector's passes; garbage made later is still collected."""

from __future__ import annotations

import gc
import weakref

from services.common.gc_freeze import freeze_start_up_objects


class Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


def test_start_up_objects_are_frozen_and_later_cycles_still_collected(caplog):
    kept = Node()
    try:
        with caplog.at_level("INFO", logger="services.common.gc_freeze"):
            freeze_start_up_objects()
        assert gc.get_freeze_count() > 0 and "start-up objects frozen" in caplog.text
        later = Node()
        gone = weakref.ref(later)
        del later
        gc.collect()
        assert gone() is None  # a cycle made after the freeze is collected as usual
        assert kept.me is kept
    finally:
        gc.unfreeze()  # the rest of the test session collects as before
