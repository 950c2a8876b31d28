"""A latch: ``threading.Event`` for something that happens once, at a fraction of its cost.

Python's Event is a Condition, a lock and a list of waiters, each wait with a lock of its
own: making one costs about as much as reading a small file, and a core makes several per
service (a program's exit, a final state written). A latch is one lock, held from its
making until it is set; a waiter takes the lock and hands it straight back, so every
waiter gets through once it is set, and none spins. It cannot be cleared.
"""

from __future__ import annotations

import threading


class Latch:
    """``set``, ``is_set`` and ``wait`` as ``threading.Event`` has them; no ``clear``."""

    __slots__ = ("_lock", "_set")

    def __init__(self) -> None:
        self._set = False
        self._lock = threading.Lock()
        self._lock.acquire()

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        if self._set:
            return
        self._set = True
        self._release()

    def wait(self, timeout: float | None = None) -> bool:
        """True once it is set; False when ``timeout`` seconds pass first."""
        if self._set:
            return True
        if timeout is not None and timeout <= 0:
            return False
        if self._lock.acquire(True, -1 if timeout is None else timeout):
            self._release()  # for the next waiter
        return self._set

    def _release(self) -> None:
        try:
            self._lock.release()
        except RuntimeError:  # released already: set by two threads at once
            pass
