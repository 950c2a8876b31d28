"""The supervisor thread: ticks every service, at once when poked, survives a failing one."""

from __future__ import annotations

import threading

from soaf.core.enforcer import LimitEnforcer
from tests.conftest import wait_until


class Ticked:
    def __init__(self, service_id: str, fail: bool = False) -> None:
        self.service_id = service_id
        self.fail = fail
        self.ticks: list[float] = []
        self.ticked = threading.Event()

    def tick(self, now: float) -> None:
        self.ticks.append(now)
        self.ticked.set()
        if self.fail:
            raise RuntimeError("broken on purpose")


def test_ticks_pokes_and_removal():
    sup = LimitEnforcer(interval=60)  # only pokes make it tick in this test
    sup.start()
    try:
        good, bad = Ticked("good"), Ticked("bad", fail=True)
        sup.add(bad)
        sup.add(good)
        sup.poke()
        assert good.ticked.wait(5) and bad.ticked.wait(5)  # the failing one stops nothing
        good.ticked.clear()
        sup.remove(good)
        sup.poke()
        wait_until(lambda: len(bad.ticks) >= 2, 5, message="a second tick")
        assert not good.ticked.is_set()
    finally:
        sup.stop()


def test_ticks_every_interval():
    sup = LimitEnforcer(interval=0.05)
    run = Ticked("one")
    sup.add(run)
    sup.start()
    try:
        wait_until(lambda: len(run.ticks) >= 3, 10, message="three ticks")
    finally:
        sup.stop()


def test_fast_services_are_ticked_more_often():
    sup = LimitEnforcer(interval=60, fast_interval=0.02)
    slow, fast = Ticked("slow"), Ticked("fast")
    fast.fast = True  # type: ignore[attr-defined]
    sup.add(slow)
    sup.add(fast)
    sup.start()
    try:
        wait_until(lambda: len(fast.ticks) >= 10, 10, message="ten fast ticks")
        assert slow.ticks == []  # a slow one waits for the interval (or a poke)
        sup.remove(fast)
        sup.poke()
        wait_until(lambda: len(slow.ticks) == 1, 5, message="a poke")
    finally:
        sup.stop()
