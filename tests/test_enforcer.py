"""The supervisor thread: ticks every service, at once when poked, survives a failing one."""

from __future__ import annotations

import threading
import time

from soaf.config import Settings
from soaf.core.enforcer import RELAXED_EVERY, LimitEnforcer
from soaf.run.control import Halt
from soaf.run.limits import FIRST_SAMPLE, MAX_SAMPLE_INTERVAL, YOUNG, Limits
from soaf.run.policy import Policy
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


def started_slow_and_fast(sup: LimitEnforcer) -> tuple[Ticked, Ticked]:
    """A service without a memory limit and one with (``fast``), added to a started ``sup``."""
    slow, fast = Ticked("slow"), Ticked("fast")
    fast.fast = True  # type: ignore[attr-defined]
    sup.add(slow)
    sup.add(fast)
    sup.start()
    return slow, fast


def test_fast_services_are_ticked_more_often():
    sup = LimitEnforcer(interval=60, fast_interval=0.02)
    slow, fast = started_slow_and_fast(sup)
    try:
        wait_until(lambda: len(fast.ticks) >= 10, 10, message="ten fast ticks")
        assert slow.ticks == []  # a slow one waits for the interval (or a poke)
        sup.remove(fast)
        sup.poke()
        wait_until(lambda: len(slow.ticks) == 1, 5, message="a poke")
    finally:
        sup.stop()


class LatePoke(threading.Event):
    """The enforcer's poke event, armed to be poked just as a wait runs out: the moment
    between the end of a wait and what the loop does next."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False

    def wait(self, timeout: float | None = None) -> bool:
        got = super().wait(timeout)
        if self.armed and not got:
            self.armed = False
            self.set()  # another thread pokes right now
        return got


def test_a_poke_as_a_wait_runs_out_is_not_lost():
    sup = LimitEnforcer(interval=60, fast_interval=0.02)
    late = sup._poked = LatePoke()
    slow, fast = started_slow_and_fast(sup)
    try:
        wait_until(lambda: len(fast.ticks) >= 2, 10, message="fast ticks")
        late.armed = True  # the next fast wait runs out and a poke lands
        wait_until(lambda: not late.armed, 5, message="the late poke")
        sup.remove(fast)  # nothing wakes the loop for 60 s now but that poke
        wait_until(lambda: len(slow.ticks) == 1, 5, message="the poke's tick")
    finally:
        sup.stop()


class Sampled:
    """A program whose memory the limits sample: counts the samples."""

    def __init__(self) -> None:
        self.samples = 0

    def rss_kb(self) -> int:
        self.samples += 1
        return 1000

    def begin_stop(self, grace: float) -> None:
        raise AssertionError("no limit was passed")


def test_a_long_running_program_without_a_limit_is_sampled_less_often():
    limits = Limits(Policy(), Halt(), Settings())
    program = Sampled()
    limits.started(ran_for=600.0)  # adopted after ten minutes of running
    start = time.monotonic()
    for step in range(200):  # 20 s of enforcer ticks
        limits.enforce(start + FIRST_SAMPLE + step * 0.1, program, "svc")
    # at 0, 5, 10 and 15 s: every MAX_SAMPLE_INTERVAL, not every SAMPLE_INTERVAL (40)
    assert program.samples == 20 // MAX_SAMPLE_INTERVAL


def test_a_young_program_and_a_limited_one_are_sampled_as_before():
    young, limited = Sampled(), Sampled()
    a = Limits(Policy(), Halt(), Settings())
    b = Limits(Policy(max_memory_kb=10_000), Halt(), Settings())
    a.started()
    b.started()
    start = time.monotonic()
    for step in range(50):  # 5 s of ticks, every 0.1 s
        a.enforce(start + FIRST_SAMPLE + step * 0.1, young, "a")
        b.enforce(start + step * 0.1, limited, "b")
    assert young.samples >= 8  # every SAMPLE_INTERVAL (0.5 s, give or take a tick) at first
    assert limited.samples == 50  # every tick (each is past MEMORY_CHECK_INTERVAL)


def test_a_program_is_young_until_its_first_samples_are_taken():
    """A young program is ticked at every pass (its samples at their first pace), so a
    program that runs under a second still has its peak memory sampled."""
    limits = Limits(Policy(), Halt(), Settings())
    assert limits.young(time.monotonic())  # not started yet
    limits.started()
    now = time.monotonic()
    assert limits.young(now) and limits.young(now + YOUNG - 0.1)
    assert not limits.young(now + YOUNG + 0.1)
    limits.started(ran_for=YOUNG + 1)  # a program re-adopted after a restart
    assert not limits.young(time.monotonic())


class Run(Ticked):
    """A service as the enforcer sees it, with the policy and halt it looks at."""

    def __init__(self, service_id: str, timeout: float | None = None) -> None:
        super().__init__(service_id)
        self.policy = Policy(timeout=timeout)
        self.halt = Halt()


def test_a_service_with_nothing_due_is_ticked_on_its_turn_only():
    sup = LimitEnforcer()
    relaxed = [Run(f"r{i}") for i in range(8)]
    timed, cancelled, unknown = Run("timed", timeout=60), Run("cancelled"), Run("unknown")
    cancelled.halt.cancel()
    unknown.settled = False  # its shim had not forked the program yet, or it is young
    for run in [*relaxed, timed, cancelled, unknown]:
        sup.add(run)
    for _ in range(4 * RELAXED_EVERY):
        sup._passes += 1
        sup.tick(spread=True)
    assert len(timed.ticks) == len(cancelled.ticks) == len(unknown.ticks) == 4 * RELAXED_EVERY
    assert [len(run.ticks) for run in relaxed] == [4] * 8  # one pass in RELAXED_EVERY
    sup.tick()  # a poke's pass: every service
    assert [len(run.ticks) for run in relaxed] == [5] * 8
