"""The pool of run threads: an ended run's thread serves the next run; idle ones end."""

from __future__ import annotations

import threading
import time
import weakref

from soaf.run.threads import IDLE_NAME, ThreadPool


def _wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_an_idle_thread_serves_the_next_run_under_its_name():
    pool = ThreadPool(idle_seconds=5)
    seen: list[tuple[int, str]] = []
    done = threading.Event()

    def run() -> None:
        me = threading.current_thread()
        seen.append((me.ident or 0, me.name))
        done.set()

    pool.start(run, "soaf-svc-first")
    done.wait(5)
    _wait_for(lambda: pool.idle() == 1)
    done.clear()
    pool.start(run, "soaf-svc-second")
    done.wait(5)
    assert pool.created == 1
    assert seen[0][0] == seen[1][0]  # the same thread
    assert [name for _, name in seen] == ["soaf-svc-first", "soaf-svc-second"]
    _wait_for(lambda: pool.idle() == 1)
    assert any(t.name == IDLE_NAME for t in threading.enumerate())


def test_runs_at_once_get_threads_of_their_own_and_idle_threads_end():
    pool = ThreadPool(idle_seconds=0.2)
    gate = threading.Event()
    started = threading.Semaphore(0)
    threads: set[threading.Thread] = set()

    def run() -> None:
        threads.add(threading.current_thread())
        started.release()
        gate.wait(5)

    for i in range(4):
        pool.start(run, f"soaf-svc-{i}")
    for _ in range(4):
        assert started.acquire(timeout=5)
    assert pool.created == 4 and len(threads) == 4
    gate.set()
    _wait_for(lambda: not any(t.is_alive() for t in threads))  # idle for 0.2 s: they end
    assert pool.idle() == 0


def test_a_run_that_raises_does_not_cost_its_thread():
    pool = ThreadPool(idle_seconds=5)
    done = threading.Event()

    def bad() -> None:
        raise RuntimeError("boom")

    pool.start(bad, "soaf-svc-bad")
    _wait_for(lambda: pool.idle() == 1)
    pool.start(done.set, "soaf-svc-good")
    assert done.wait(5) and pool.created == 1


def test_an_idle_thread_keeps_nothing_of_its_last_run_alive():
    class Run:
        def go(self) -> None:
            pass

    pool = ThreadPool(idle_seconds=60)  # (an ended thread would free it anyway)
    run = Run()
    gone = weakref.ref(run)
    pool.start(run.go, "soaf-svc-kept")
    del run
    _wait_for(lambda: pool.idle() == 1)
    _wait_for(lambda: gone() is None)  # by reference counting: no collection runs here
