"""Threads for service runs, kept for the next run once one ends.

Every run has a thread of its own (soaf.run.service_run). Creating a thread costs about
as much CPU as spawning the trivial program it watches (a clone, a stack, its
bookkeeping), so a core that runs hundreds of short services a second keeps the threads
of ended runs idle for a while and hands them the next runs. A thread idle for
``IDLE_SECONDS`` ends, so a burst leaves nothing behind. A pooled thread takes the name
of the run it serves (logs and ``py-spy`` show it); thread-local values set by plugin
code may outlive its run.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

#: Seconds an idle thread waits for its next run before it ends.
IDLE_SECONDS = 30.0
#: The name of a thread between runs.
IDLE_NAME = "soaf-idle"

Task = tuple[Callable[[], None], str]


class _Worker:
    def __init__(self, pool: ThreadPool) -> None:
        self.pool = pool
        self.task: Task | None = None
        #: Held while the worker has no task; ``ThreadPool.start`` releases it with one. A
        #: bare lock hands a task over in a fraction of an Event's time (an Event is a
        #: Condition in Python, with a new lock for every wait), once per run.
        self.given = threading.Lock()
        self.given.acquire()

    def loop(self) -> None:
        me = threading.current_thread()
        task, self.task = self.task, None  # (not a Thread argument: the thread keeps those)
        while task is not None:
            target, name = task
            me.name = name
            try:
                target()
            except BaseException:  # a run catches its own errors; this is a last resort
                log.exception("thread %s ended with an error", name)
            me.name = IDLE_NAME
            del target  # idle, it keeps nothing of its last run alive
            task = None
            task = self.pool.next_task(self)


class ThreadPool:
    """``start(target, name)`` runs ``target`` in a thread: an idle one if there is one,
    else a new daemon thread."""

    def __init__(self, idle_seconds: float = IDLE_SECONDS) -> None:
        self.idle_seconds = idle_seconds
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        self.created = 0  # threads started so far (the rest of the runs reused one)

    def start(self, target: Callable[[], None], name: str) -> None:
        with self._lock:
            worker = self._idle.pop() if self._idle else None
            if worker is None:
                self.created += 1
        if worker is not None:
            worker.task = (target, name)
            worker.given.release()
            return
        worker = _Worker(self)
        worker.task = (target, name)
        threading.Thread(target=worker.loop, name=name, daemon=True).start()

    def idle(self) -> int:
        with self._lock:
            return len(self._idle)

    def next_task(self, worker: _Worker) -> Task | None:
        """Wait (idle) for the next task of ``worker``; None when it should end."""
        with self._lock:
            self._idle.append(worker)
        if not worker.given.acquire(timeout=self.idle_seconds):
            with self._lock:
                if worker in self._idle:  # nobody took it meanwhile: end
                    self._idle.remove(worker)
                    return None
            worker.given.acquire()  # taken as the wait ran out: its task is on the way
        task, worker.task = worker.task, None
        return task


#: The threads of this process's service runs.
RUN_THREADS = ThreadPool()
