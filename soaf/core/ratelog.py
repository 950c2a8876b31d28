"""Rate-limited logging for the threads that must outlive anything Redis hands them.

The heartbeat, the intake loop, the control listener, the takeover loop and the state
writer catch every error of one iteration and go on; a record someone keeps corrupting
would otherwise fill the log. Each kind of error is logged at most once per interval.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

#: Seconds between two log lines of one kind.
DEFAULT_INTERVAL = 60.0


class RateLimitedLog:
    """``log.exception`` (or ``log.warning``) at most once per ``interval`` per kind."""

    def __init__(self, log: logging.Logger, *, interval: float = DEFAULT_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._log = log
        self._interval = interval
        self._clock = clock
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def _due(self, kind: str) -> bool:
        now = self._clock()
        with self._lock:
            last = self._last.get(kind)
            if last is not None and now - last < self._interval:
                return False
            self._last[kind] = now
            return True

    def exception(self, kind: str, msg: str, *args: object) -> None:
        """Log the exception being handled (with its traceback) if ``kind`` is due."""
        if self._due(kind):
            self._log.error(msg + " (logged at most once a minute)", *args, exc_info=True)

    def warning(self, kind: str, msg: str, *args: object) -> None:
        if self._due(kind):
            self._log.warning(msg, *args)
