"""The latch (a one-shot Event): waiters with and without timeouts, many of them, and
setters racing each other."""

from __future__ import annotations

import threading
import time

from soaf.process.latch import Latch


def test_a_wait_times_out_until_it_is_set_then_returns_at_once():
    latch = Latch()
    assert not latch.is_set() and not latch.wait(0) and not latch.wait(-1)
    t0 = time.monotonic()
    assert not latch.wait(0.05)
    assert time.monotonic() - t0 >= 0.04
    latch.set()
    assert latch.is_set() and latch.wait() and latch.wait(0) and latch.wait(5)
    latch.set()  # again: nothing changes
    assert latch.wait(0)


def test_every_waiter_gets_through_once_it_is_set():
    latch = Latch()
    woke: list[bool] = []
    waiters = [threading.Thread(target=lambda t=t: woke.append(latch.wait(t)))
               for t in (None, 30.0, None, 30.0, None, 30.0, None, 30.0)]
    for w in waiters:
        w.start()
    time.sleep(0.05)
    assert woke == []
    latch.set()
    for w in waiters:
        w.join(10)
    assert woke == [True] * len(waiters)
    assert latch.wait(0)


def test_setters_racing_each_other_and_waiters_leave_it_set():
    for _ in range(200):
        latch = Latch()
        barrier = threading.Barrier(6)

        def setter(latch: Latch = latch, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            latch.set()

        def waiter(latch: Latch = latch, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            assert latch.wait(10)

        threads = [threading.Thread(target=f) for f in (setter, setter, setter, waiter,
                                                        waiter, waiter)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert latch.is_set() and latch.wait(0) and latch.wait(0.01)
