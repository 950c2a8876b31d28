"""When a running service will be done: an estimate from the recent rate of its progress.

Every progress change of a service (from its handler or a progress probe) is a sample
``(time, progress)``. The rate is taken over the samples of the last ``WINDOW`` seconds
(at least the last two), so a program that speeds up or slows down is followed within
that time, and the estimate is the moment the rest would be done at that rate. It is
written to the record as ``eta`` (Unix time) beside ``progress``; a client shows the
time left from it without further updates.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

#: Seconds of progress samples the rate is taken over.
WINDOW = 30.0


class EtaEstimate:
    """The ETA of one run, fed with each new progress value."""

    def __init__(self, *, window: float = WINDOW, clock: Callable[[], float] = time.time) -> None:
        self.window = window
        self.clock = clock
        self.samples: deque[tuple[float, float]] = deque()

    def update(self, progress: float) -> float | None:
        """The expected end (Unix time) after progress reached ``progress``; None while the
        rate is not known (fewer than two samples, or no advance over the window)."""
        now = self.clock()
        samples = self.samples
        if samples and progress < samples[-1][1]:
            samples.clear()  # it went back (a new phase): the old rate says nothing
        samples.append((now, progress))
        while len(samples) > 2 and now - samples[1][0] >= self.window:
            samples.popleft()  # keep one sample at or before the window's start
        if progress >= 1.0:
            return now
        first_t, first_p = samples[0]
        if now <= first_t or progress <= first_p:
            return None
        rate = (progress - first_p) / (now - first_t)
        return now + (1.0 - progress) / rate
