"""PluginThread: plugin calls off the supervising thread; hung calls are abandoned."""

from __future__ import annotations

import threading

from soaf import callbacks
from soaf.callbacks import PluginThread


def test_results_errors_and_order():
    plugin = PluginThread("t")
    seen: list[int] = []
    calls = [plugin.submit("append", seen.append, i) for i in range(5)]
    assert all(c.wait(5) for c in calls) and seen == [0, 1, 2, 3, 4]
    ok = plugin.submit("add", lambda a, b: a + b, 2, 3)
    assert ok.wait(5) and ok.unwrap() == 5
    bad = plugin.submit("raise", lambda: 1 / 0)
    assert bad.wait(5) and isinstance(bad.error, ZeroDivisionError)
    assert "ZeroDivisionError" in bad.traceback

    def leave():
        raise SystemExit(3)

    gone = plugin.submit("exit", leave)
    assert gone.wait(5) and isinstance(gone.error, SystemExit)  # captured, thread lives on
    after = plugin.submit("still", lambda: "alive")
    assert after.wait(5) and after.result == "alive"
    plugin.close()


def test_a_hung_call_is_abandoned_and_the_next_runs_in_a_new_thread():
    plugin = PluginThread("t")
    release = threading.Event()
    hung = plugin.submit("hang", release.wait)
    assert not hung.wait(0.2)
    assert plugin.busy
    before = callbacks.abandoned_threads
    plugin.abandon()
    assert callbacks.abandoned_threads == before + 1 and not plugin.busy
    names: list[str] = []
    nxt = plugin.submit("next", lambda: names.append(threading.current_thread().name))
    assert nxt.wait(5) and names == ["t-plugin2"]
    release.set()
    assert hung.wait(5)  # the old thread finishes its call, then ends
    plugin.close()


def test_wait_gives_up_when_told():
    plugin = PluginThread("t")
    release = threading.Event()
    call = plugin.submit("hang", release.wait)
    stop = threading.Event()
    stop.set()
    assert call.wait(until=stop) is False
    assert call.wait(poll=lambda: True) is False
    release.set()
    assert call.wait(5)
    plugin.close()
