"""The core process's garbage collector, set for a long-lived server.

A core imports what it needs at start (soaf, redis-py, click, the plugins), then runs
services whose objects reference counting frees the moment each run is over (a run leaves
no reference cycle behind: tests/e2e/test_core_memory.py). With Python's defaults the
collector still re-examines the ~50,000 objects of the start over and over: a young
collection every 700 allocations, and full passes over everything. Measured over 3,000
trivial services (bench/throughput.py): 1.8 s of collection while runs were cycles,
0.8 s once they were not, 0.09-0.13 s with the settings below.
"""

from __future__ import annotations

import gc

#: Allocations between two collections of the young generation (Python's default: 700).
YOUNG_THRESHOLD = 10_000


def settle_heap() -> None:
    """Once the core has started: what the start created leaves the collector's sight
    (``gc.freeze``; a plugin module reloaded away later is then kept, once), and the
    young generation is collected less often (its objects are few and short-lived)."""
    gc.collect()
    gc.freeze()
    _young, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
