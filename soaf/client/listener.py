"""The notify-channel subscription a client's waits share: a thread for ``Client``, a
task for ``AsyncClient``.

One connection per client, subscribed while a wait runs and IDLE_S after the last one
ended, so back-to-back waits subscribe once. Each note heard goes to the waits that want
it (soaf.client.notes.Board); the waits read records themselves, on the client's other
connection. A failed connection is made again with backoff, and each confirmed
subscription is counted on the board, so the waits re-read what they may have missed. A
silent connection is PINGed: one to a host that vanished (no reset ever comes) would
otherwise hear nothing, and say so to nobody, for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import redis

from soaf.client.calls import unreachable
from soaf.client.notes import Board, Task, Wait
from soaf.errors import StateError

if TYPE_CHECKING:
    import redis.asyncio
    from redis.client import PubSub

log = logging.getLogger(__name__)

#: Seconds one read of the channel may block: also how soon the listener of a closed
#: (or idle) client lets its connection go.
POLL_S = 0.5
#: Seconds a listener keeps its subscription after the last wait ended.
IDLE_S = 10.0
#: Seconds of silence on the connection before a PING, then without an answer to it
#: before the connection counts as lost.
PING_S = 10.0
#: Longest pause between two attempts to subscribe again.
PAUSE_MAX = 2.0
#: Messages handed over at once (one lock) when many are waiting.
BATCH = 500


class Liveness:
    """When to PING a silent connection, and when to give it up."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._heard = clock()
        self._pinged: float | None = None

    def heard(self) -> None:
        self._heard, self._pinged = self._clock(), None

    def ping_due(self) -> bool:
        """True when a PING should go now (then it counts as sent); ConnectionError when
        the last one got no answer in time."""
        now = self._clock()
        if self._pinged is not None:
            if now - self._pinged >= PING_S:
                raise redis.ConnectionError(f"no answer to a PING in {PING_S:g} s")
            return False
        if now - self._heard >= PING_S:
            self._pinged = now
            return True
        return False


def _woken(board: Board, messages: list[dict[str, Any]]) -> set[Wait]:
    """The waits that ``messages`` (pub/sub messages, in order) give something to do."""
    woken: set[Wait] = set()
    for message in messages:
        if message["type"] == "subscribe":
            woken.update(board.up())
        elif message["type"] == "message":
            woken.update(board.hear(message["data"]))
    return woken


class Listener:
    """``Client``'s subscription, in a daemon thread started by the first wait. Safe to
    share between threads: the board and the waits are changed under one lock, and only
    by the thread currently listening."""

    def __init__(self, connect: Callable[[], redis.Redis], channel: str, url: str) -> None:
        self._connect, self._channel, self._url = connect, channel, url
        self.board = Board()
        self._lock = threading.Lock()
        self._wakes: dict[Wait, threading.Condition] = {}
        self._thread: threading.Thread | None = None
        self._kick = threading.Event()  # ends a pause between two attempts to subscribe

    def join(self, wait: Wait) -> None:
        with self._lock:
            self.board.join(wait)
            self._wakes[wait] = threading.Condition(self._lock)
            self._start()
        self._kick.set()  # a new wait tries at once, not after a backoff

    def leave(self, wait: Wait) -> None:
        with self._lock:
            self.board.leave(wait)
            del self._wakes[wait]

    def expect(self, service_id: str) -> None:
        """See ``Board.expect``."""
        with self._lock:
            self.board.expect(service_id)

    def forget(self, service_id: str) -> None:
        with self._lock:
            self.board.forget(service_id)

    def next_task(self, wait: Wait) -> Task:
        """Block until ``wait`` has records to read (see ``Wait.task``)."""
        with self._lock:
            while (task := wait.task(self.board)) is None:
                self._start()  # again, should it have died
                self._wakes[wait].wait(wait.block_s(self.board))
            return task

    def settle(self, wait: Wait, task: Task, replies: list[Any]) -> list[Any]:
        with self._lock:
            return wait.settle(task, replies)

    def close(self) -> None:
        """Let the connection go (within POLL_S); a later wait subscribes again."""
        with self._lock:
            self._thread = None
            self.board.gone()
        self._kick.set()

    def _start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="soaf-notify", daemon=True)
            self._thread.start()

    def _tell(self, me: threading.Thread, change: Callable[[], Iterable[Wait]]) -> None:
        """Apply ``change`` to the board and wake the waits it names, if ``me`` is still
        the listener (one that was let go must not touch the board)."""
        with self._lock:
            if self._thread is me:
                for wait in change():
                    self._wakes[wait].notify()

    def _run(self) -> None:
        me, conn, pubsub = threading.current_thread(), None, None
        idle_since: float | None = None
        live, pause = Liveness(), 0.1
        try:
            while True:
                with self._lock:
                    if self._thread is not me:
                        return
                    idle_since = None if self.board.waits else idle_since or time.monotonic()
                    if idle_since is not None and (
                            pubsub is None or time.monotonic() - idle_since >= IDLE_S):
                        self._thread = None
                        self.board.gone()
                        return
                try:
                    if pubsub is None:
                        conn = conn or self._connect()
                        pubsub = conn.pubsub()  # type: ignore[no-untyped-call]
                        pubsub.subscribe(self._channel)
                        live = Liveness()
                    messages = self._read(pubsub)
                    if messages:
                        live.heard()
                        pause = 0.1
                    elif live.ping_due():
                        pubsub.ping()
                    self._tell(me, functools.partial(_woken, self.board, messages))
                except (redis.RedisError, OSError) as e:
                    log.debug("the notify channel was lost: %s", e)
                    _close(pubsub)
                    pubsub = None
                    self._kick.clear()
                    self._tell(me, functools.partial(self.board.down, unreachable(self._url, e)))
                    self._kick.wait(pause)
                    pause = min(pause * 2, PAUSE_MAX)
        except Exception as e:  # a bug: the waits must not hang on it
            log.exception("the notify listener failed")
            failure = StateError(f"the notify listener failed: {e}")
            self._tell(me, functools.partial(self.board.down, failure))
        finally:
            _close(pubsub)
            if conn is not None:
                conn.close()

    @staticmethod
    def _read(pubsub: PubSub) -> list[dict[str, Any]]:
        """What the channel has: the next message (waiting up to POLL_S), then those
        already arrived, read as the connection's raw replies: a note costs one reply
        parse, not a pass through redis-py's per-message machinery (the replies that are
        not plain messages still go through it). A message only partly arrived is read
        to its end."""
        message = pubsub.get_message(timeout=POLL_S)
        out = [] if message is None else [message]
        conn = pubsub.connection
        while message is not None and len(out) < BATCH and conn is not None \
                and conn.can_read(timeout=0):
            reply = conn.read_response(disconnect_on_error=False, push_request=True)
            if isinstance(reply, list) and len(reply) == 3 and reply[0] == b"message":
                out.append({"type": "message", "data": reply[2]})
            elif reply and (message := pubsub.handle_message(reply)) is not None:
                out.append(message)
        return out


def _close(pubsub: PubSub | None) -> None:
    if pubsub is not None:
        with contextlib.suppress(Exception):
            pubsub.close()


class AsyncListener:
    """``AsyncClient``'s subscription, in a task of the event loop of the first wait."""

    def __init__(self, connect: Callable[[], redis.asyncio.Redis], channel: str,
                 url: str) -> None:
        self._connect, self._channel, self._url = connect, channel, url
        self.board = Board()
        self._wakes: dict[Wait, asyncio.Event] = {}
        self._task: asyncio.Task[None] | None = None
        self._kick: asyncio.Event | None = None

    def join(self, wait: Wait) -> None:
        self.board.join(wait)
        self._wakes[wait] = asyncio.Event()
        self._start()
        assert self._kick is not None
        self._kick.set()

    def leave(self, wait: Wait) -> None:
        self.board.leave(wait)
        del self._wakes[wait]

    def expect(self, service_id: str) -> None:
        self.board.expect(service_id)

    def forget(self, service_id: str) -> None:
        self.board.forget(service_id)

    async def next_task(self, wait: Wait) -> Task:
        """Wait until ``wait`` has records to read (see ``Wait.task``)."""
        wake = self._wakes[wait]
        while (task := wait.task(self.board)) is None:
            self._start()
            wake.clear()
            block = wait.block_s(self.board)  # outside: WaitTimeout is a TimeoutError too
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(wake.wait(), block)
        return task

    def settle(self, wait: Wait, task: Task, replies: list[Any]) -> list[Any]:
        return wait.settle(task, replies)

    async def close(self) -> None:
        task, self._task = self._task, None
        self.board.gone()
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, RuntimeError):
                await task

    def _start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._kick = asyncio.Event()
            self._task = loop.create_task(self._run(self._kick))

    def _tell(self, me: asyncio.Task[Any] | None, waits: Iterable[Wait]) -> None:
        if self._task is me:
            for wait in waits:
                self._wakes[wait].set()

    async def _run(self, kick: asyncio.Event) -> None:
        me, conn, pubsub = asyncio.current_task(), None, None
        idle_since: float | None = None
        live, pause = Liveness(), 0.1
        try:
            while self._task is me:
                idle_since = None if self.board.waits else idle_since or time.monotonic()
                if idle_since is not None and (
                        pubsub is None or time.monotonic() - idle_since >= IDLE_S):
                    self._task = None
                    self.board.gone()
                    return
                try:
                    if pubsub is None:
                        conn = conn or self._connect()
                        pubsub = conn.pubsub()
                        await pubsub.subscribe(self._channel)
                        live = Liveness()
                    message = await pubsub.get_message(timeout=POLL_S)
                    if message is not None:
                        live.heard()
                        pause = 0.1
                    elif live.ping_due():
                        await pubsub.ping()
                    if message is not None and self._task is me:
                        self._tell(me, _woken(self.board, [message]))
                except (redis.RedisError, OSError) as e:
                    log.debug("the notify channel was lost: %s", e)
                    await _aclose(pubsub)
                    pubsub = None
                    kick.clear()
                    if self._task is me:
                        self._tell(me, self.board.down(unreachable(self._url, e)))
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(kick.wait(), pause)
                    pause = min(pause * 2, PAUSE_MAX)
        except Exception as e:  # a bug: the waits must not hang on it
            log.exception("the notify listener failed")
            if self._task is me:
                self._tell(me, self.board.down(StateError(f"the notify listener failed: {e}")))
        finally:
            await _aclose(pubsub)
            if conn is not None:
                await conn.aclose()


async def _aclose(pubsub: Any) -> None:
    if pubsub is not None:
        with contextlib.suppress(Exception):
            await pubsub.aclose()
