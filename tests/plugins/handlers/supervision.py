"""Handlers for the supervision tests: ones that count, raise, or never return."""

import time

from soaf import WatcherHandler


def note(service, what):
    """Append a line to callbacks.txt in the work dir (survives any field overwrite)."""
    with open(service.work_dir / "callbacks.txt", "a") as f:
        f.write(what + "\n")


class CountingHandler(WatcherHandler):
    """Counts after_watch_callback calls per attempt and records what it was told."""

    def after_watch_callback(self, service, files):
        note(service, "after")
        service.set(after_calls=service.fields.get("after_calls", 0) + 1,
                    after_outcome=service.outcome,
                    after_exit_signal=service.exit.signal if service.exit else None)


class StubbornHandler(CountingHandler):
    service = "stubborn"


class ShortTimeoutHandler(CountingHandler):
    service = "short-timeout"


class SlowBuildHandler(CountingHandler):
    service = "slowbuild"


class ForkerHandler(CountingHandler):
    service = "forker"


class FlakyHandler(CountingHandler):
    service = "flaky"


class RaisingHandler(WatcherHandler):
    """file_change_callback raises every time; the watcher must carry on calling it."""

    service = "cb-raise"

    def file_change_callback(self, service, files):
        service.set(change_calls=service.fields.get("change_calls", 0) + 1)
        raise ValueError(f"file_change_callback broke on purpose ({len(files)} files)")

    def after_watch_callback(self, service, files):
        note(service, "after")
        service.set(after_ran=True)


class AfterRaisingHandler(WatcherHandler):
    service = "cb-after-raise"

    def after_watch_callback(self, service, files):
        raise RuntimeError("after_watch_callback broke on purpose")


class HangingHandler(WatcherHandler):
    """The first file_change_callback never returns."""

    service = "cb-hang"

    def file_change_callback(self, service, files):
        note(service, "change")
        time.sleep(3600)

    def after_watch_callback(self, service, files):
        note(service, "after")
        service.set(after_ran=True)


class AfterHangingHandler(WatcherHandler):
    service = "cb-after-hang"

    def after_watch_callback(self, service, files):
        note(service, "after")
        time.sleep(3600)


class BeforeHangingHandler(WatcherHandler):
    """before_watch_callback never returns: the program must still be stopped on time."""

    service = "cb-before-hang"

    def before_watch_callback(self, service):
        note(service, "before")
        time.sleep(3600)

    def after_watch_callback(self, service, files):
        note(service, "after")
        service.set(after_outcome=service.outcome)
