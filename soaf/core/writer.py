"""StateWriter: the one thread that writes every state change to Redis, in order.

Services never talk to Redis themselves; they queue ``Change``s here (and the log
keeper its ``LogLines``). The writer sends
whatever is queued as one pipeline, so a busy core pays one round trip for many
changes. When Redis is unreachable it keeps the changes, retries with backoff, and
writes them in their original order once Redis is back; the record script skips
anything already applied, so a retried batch writes nothing twice. A stream entry is
acknowledged only once its service's final state is written (by the very script call that
writes it), and never for a change that a newer attempt fenced out.

With ``replicas`` (SOAF_DURABLE_SUBMIT, soaf.protocol.durable) a batch that holds a final
state (and so its acknowledgements) ends with a WAIT on the same connection, and counts
as written only once that many replicas hold it. Until then the writer keeps the batch
and sends it again, as through an outage: to the same master the record script skips
what it has, and after a failover the new master gets what the old one acknowledged but
never replicated. Fencing by (attempt, seq) makes the second send safe.

A change that ends nothing waits up to ``HOLD`` for the ones that follow it: a short
service's building, preparing, running and exit then go to Redis in the same script call
as its final state, one call instead of one each. Every change keeps its own event; only
the record's intermediate states show up that much later: at most 0.1 s, or 0.5 s
(``BUSY_HOLD``) while more than ``BUSY`` services have changes waiting. A final state or
a change someone waits for (``on_written``) sends its own service's changes at once, with
every other service's that waited its hold already (a busy core's final states do not
cut the other services' runs of changes short); a ``flush`` sends everything.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import redis

from soaf.errors import NotReplicated
from soaf.protocol import durable
from soaf.protocol.keys import Keys
from soaf.protocol.scripts import FINISH, RECORD, is_noscript
from soaf.protocol.state import Change, finish_call, record_call

log = logging.getLogger(__name__)


class Writable(Protocol):
    """Anything else the writer writes in queue order (e.g. ``soaf.core.logkeeper.LogLines``)."""

    def write_to(self, pipe: Any, keys: Keys) -> None: ...


#: Changes sent in one pipeline at most.
BATCH = 500
#: Longest pause between reconnection attempts, in seconds.
MAX_BACKOFF = 5.0
#: Seconds the first of a run of changes that end nothing may wait for more (see above).
HOLD = 0.1
#: ... while more than ``BUSY`` services have changes waiting: a loaded core's trivial
#: services take longer than ``HOLD`` from claim to final (most in the core's own queues),
#: and each write cut short costs a script call with its reads and events.
BUSY_HOLD = 0.5
BUSY = 16


#: A queued item: when it was queued, the item, its service and attempt (None for what is
#: not a change), and whether it goes to Redis at once.
_Queued = tuple[float, "Change | Writable", "tuple[str, int] | None", bool]


def _at_once(item: Change | Writable) -> bool:
    """Whether ``item`` goes to Redis at once: a final state (it acknowledges its entry),
    a change someone waits for, and whatever is not a change (log lines)."""
    return not isinstance(item, Change) or item.ack is not None or item.on_written is not None


class StateWriter:
    """Queue changes with ``put``; a background thread writes them."""

    def __init__(self, client: redis.Redis, keys: Keys, *, record_ttl: float = 0,
                 replicas: int = 0) -> None:
        self._redis = client
        self._replicas = replicas
        if replicas:
            log.info("final states count as written once %d replica(s) hold them", replicas)
        self._keys = keys
        self._record_ttl = record_ttl
        #: What is queued, in the order it was put.
        self._queue: collections.deque[_Queued] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._busy = False
        self._flushing = 0  # threads in ``flush``: nothing is held back for them
        self._urgent = 0  # queued changes to write now
        self._since = 0.0  # when the oldest queued change was queued (monotonic)
        self.hold = HOLD
        self.busy_hold = BUSY_HOLD
        #: Changes queued per (service, attempt): how many services have some waiting.
        self._waiting: collections.Counter[tuple[str, int]] = collections.Counter()
        self.connected = True
        self.written = 0
        #: Times Redis came back after the writer lost it (the metrics' reconnects).
        self.reconnects = 0
        #: Called with every ``Change`` queued (the core's metrics); must not raise.
        self.observe: Callable[[Change], None] | None = None
        self._thread = threading.Thread(target=self._run, name="soaf-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def put(self, change: Change | Writable) -> None:
        if self.observe is not None and isinstance(change, Change):
            self.observe(change)
        urgent = _at_once(change)
        key = (change.service_id, change.attempt) if isinstance(change, Change) else None
        now = time.monotonic()
        with self._cond:
            if not self._queue:
                self._since = now
                wake = True
            else:  # the writer is writing, or holds what is queued and wakes when it is due
                wake = urgent and not self._urgent
            self._urgent += urgent
            self._queue.append((now, change, key, urgent))
            if key is not None:
                self._waiting[key] += 1
            if wake:
                self._cond.notify()

    def pending(self) -> int:
        return len(self._queue) + (1 if self._busy else 0)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued so far is written; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._flushing += 1
            self._cond.notify_all()
            try:
                while self._queue or self._busy:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    self._cond.wait(min(left, 0.05))
            finally:
                self._flushing -= 1
        return True

    def _held(self) -> float:
        """Seconds the queued changes may still wait for more (0: write them now)."""
        if self._urgent or not self._held_back():
            return 0.0
        return self._since + self._hold() - time.monotonic()

    def _hold(self) -> float:
        return self.busy_hold if len(self._waiting) > BUSY else self.hold

    def _take(self) -> list[_Queued]:
        """Take the next batch off the queue (under the lock): everything, or while
        holding only the services that have a change to send now or waited ``hold``."""
        queue = self._queue
        if not self._held_back():
            first = [queue.popleft() for _ in range(min(BATCH, len(queue)))]
            self._settle(first)
            return first
        due = time.monotonic() - self._hold()
        send = {key for at, _, key, urgent in queue
                if key is not None and (urgent or at <= due)}
        batch: list[_Queued] = []
        kept: collections.deque[_Queued] = collections.deque()
        for entry in queue:
            if len(batch) < BATCH and (entry[2] is None or entry[2] in send):
                batch.append(entry)
            else:
                kept.append(entry)
        self._queue = kept
        self._settle(batch)
        return batch

    def _settle(self, moved: list[_Queued], *, back: bool = False) -> None:
        """Recount, after ``moved`` left the queue (or came ``back`` to it), how many
        services have changes waiting, how many changes are due now, and when the oldest
        change is due."""
        waiting, step = self._waiting, 1 if back else -1
        for _, _, key, urgent in moved:
            if key is not None:
                waiting[key] += step
                if waiting[key] <= 0:
                    del waiting[key]
            self._urgent += step * urgent
        self._since = self._queue[0][0] if self._queue else 0.0

    def _held_back(self) -> bool:
        """Changes that end nothing may wait now (not while flushing, stopping or out)."""
        return self.hold > 0 and not (self._flushing or self._stopping or not self.connected)

    def stop(self, timeout: float = 10.0) -> bool:
        """Write what is queued (up to ``timeout``) and stop; False if some was left."""
        done = self.flush(timeout)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout=2)
        if not done:
            log.error("stopping with %d state changes not written to Redis", len(self._queue))
        return done

    def _run(self) -> None:
        backoff = 0.05
        while True:
            with self._cond:
                while True:
                    while not self._queue and not self._stopping:
                        self._cond.wait()
                    if not self._queue and self._stopping:
                        return
                    held = self._held()
                    if held <= 0:
                        break
                    self._cond.wait(held)
                taken = self._take()
                self._busy = True
            batch = [item for _, item, _, _ in taken]
            try:
                self._write(batch)
            except (redis.ConnectionError, redis.TimeoutError) as e:
                self._keep(taken)
                if self.connected:
                    log.warning("Redis unreachable (%s); keeping %d state changes until it is back",
                                e, len(self._queue))
                    self.connected = False
                if self._stopping:
                    return
                time.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            except NotReplicated as e:
                self._keep(taken)
                log.warning("keeping %d state changes to send again: %s", len(batch), e)
                if self._stopping:
                    return
                time.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            except Exception:
                log.exception("dropping %d state changes that Redis refused", len(batch))
            if not self.connected:
                log.warning("Redis is back; wrote the state changes kept meanwhile")
                self.reconnects += 1
                self.connected = True
            backoff = 0.05
            with self._cond:
                self._busy = False
                self.written += len(batch)
                self._cond.notify_all()

    def _keep(self, taken: list[_Queued]) -> None:
        """A batch Redis did not take goes back to the front, to be sent first."""
        with self._cond:
            self._queue.extendleft((0.0, *entry[1:]) for entry in reversed(taken))
            self._settle(taken, back=True)
            self._busy = False

    def _finish(self, calls: list[tuple[list[Change], int]]) -> None:
        """Durable mode: finish the entries of final states once replicas hold them (the
        record calls left them pending), and count that as done only once replicas hold
        the acknowledgements too (one lost in a failover would leave the entry pending)."""
        if not calls:
            return
        for attempt in (1, 2):
            pipe = self._redis.pipeline(transaction=False)
            for changes, result in calls:
                FINISH.call(pipe, *finish_call(self._keys, changes, result,
                                               record_ttl=self._record_ttl))
            pipe.wait(self._replicas, durable.WAIT_MS)
            results = pipe.execute(raise_on_error=False)
            if attempt == 1 and any(is_noscript(r) for r in results):
                FINISH.load(self._redis)
                continue  # finishing an entry twice changes nothing
            break
        for result in results:
            if isinstance(result, (redis.ConnectionError, redis.TimeoutError)):
                raise result
            if isinstance(result, Exception):
                log.error("finishing an entry refused by Redis: %s", result)
        self._confirmed(results[-1], "the acknowledgements of final states")

    def _confirmed(self, acked: Any, what: str) -> None:
        """NotReplicated unless WAIT's reply ``acked`` reaches the replicas asked for (an
        error reply counts as none): the batch is then kept and sent again."""
        durable.confirmed(acked if isinstance(acked, int) else 0, self._replicas, what)

    def _write(self, batch: list[Change | Writable]) -> None:
        # One script call per service (and attempt): its changes in their original order.
        # Other items (log lines) go first: a service's last lines precede its final state.
        groups: dict[tuple[str, int], list[Change]] = {}
        others: list[Writable] = []
        for change in batch:
            if isinstance(change, Change):
                groups.setdefault((change.service_id, change.attempt), []).append(change)
            else:
                others.append(change)
        calls = list(groups.values())
        wait = self._replicas > 0 and any(c.ack for changes in calls for c in changes)
        for attempt in (1, 2):
            pipe = self._redis.pipeline(transaction=False)
            if attempt == 1:
                for other in others:
                    other.write_to(pipe, self._keys)
            for changes in calls:
                keys, args = record_call(self._keys, changes, record_ttl=self._record_ttl,
                                         finish=not wait)
                RECORD.call(pipe, keys, args)
            if wait:  # after the finals, on their connection: how many replicas hold them
                pipe.wait(self._replicas, durable.WAIT_MS)
            results = pipe.execute(raise_on_error=False)
            if attempt == 1 and any(is_noscript(r) for r in results):
                RECORD.load(self._redis)  # Redis restarted or flushed its scripts
                continue  # every change is fenced by (attempt, seq): re-sending is safe
            break
        for result in results:
            if isinstance(result, (redis.ConnectionError, redis.TimeoutError)):
                raise result
            if isinstance(result, Exception):
                log.error("state write refused by Redis: %s", result)
        if wait:
            self._confirmed(results.pop(), "a batch of final states")
        # The record script finished each entry only where its final state went in (see
        # RECORD_LUA): changes fenced out by a newer attempt (-1) come from a core that lost
        # the service, whose entry is now pending for the core that took it over;
        # acknowledging it would hide it from recovery. A record that is final already (-3:
        # another core ended it, or it was tampered with and the script ended it) takes no
        # change, but its entry is done.
        recorded = results[len(results) - len(calls):]  # after the other items' results
        written = [(changes, r not in (-1, -3)) for changes, r in zip(calls, recorded)
                   if not isinstance(r, Exception)]
        done = [r != -1 for r in recorded if not isinstance(r, Exception)]
        if wait:  # the entries of finals that replicas hold now; then WAIT again
            self._finish([(changes, r) for changes, r in zip(calls, recorded)
                          if isinstance(r, int) and r != -1 and any(c.ack for c in changes)])
        for changes, ok in written:
            for change in changes:
                if change.on_written is not None:
                    try:
                        change.on_written(ok)
                    except Exception:
                        log.exception("on_written callback of %s failed", change.service_id)
        ended = sum(1 for r in recorded if r == -3)
        if ended:
            log.warning("%d state changes refused: their services' records are final already",
                        ended)
        stale = sum(1 for (changes, ok), ack in zip(written, done) if not ack
                    for c in changes if c.ack)
        if stale:
            log.warning("%d final states were fenced out: a newer attempt owns those services",
                        stale)
