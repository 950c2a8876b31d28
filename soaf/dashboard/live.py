"""Hub: live updates for every open page through one subscription per dashboard process.

Cores publish a short note on ``soaf:notify`` for every write of a service's events
(docs/protocol.md). The hub alone subscribes (a thread, ``NoteListener``); every
``interval`` seconds it reads the rows of the ids noted meanwhile (one pipeline) and
hands the same update, encoded once as a server-sent event, to every open page's queue,
so a hundred browsers cost one Redis read and one encoding per interval, not a hundred.
Every ``nodes_every`` seconds it also reads the cores' heartbeats for the fleet page. A
page whose queue is full (a stalled browser) loses its oldest updates, never blocks the
others; pub/sub is at-most-once anyway, and a reload shows the truth. """

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import redis

from soaf.client.aio import AsyncClient
from soaf.dashboard.listing import rows_of
from soaf.errors import SoafError
from soaf.protocol.connection import connect

log = logging.getLogger(__name__)

#: Seconds between two updates sent to pages (changes in between are merged).
INTERVAL = 0.25
#: Seconds between two reads of the cores' heartbeats.
NODES_EVERY = 2.0
#: Seconds the note listener waits for a message before it checks for a stop.
LISTEN_WAIT = 0.5
#: Updates kept for one page before its oldest are dropped.
QUEUE_SIZE = 64

#: Seconds of silence after which a stream gets a comment line, so proxies and
#: browsers keep it open.
PING = 15.0
#: One update: an encoded server-sent event, built once for all pages.
Update = bytes


class Hub:
    """``subscribe()`` a queue of updates; ``run()`` as a task while the dashboard serves."""

    def __init__(self, client: AsyncClient, *, interval: float = INTERVAL,
                 nodes_every: float = NODES_EVERY) -> None:
        self.client = client
        self.interval = interval
        self.nodes_every = nodes_every
        self._queues: set[asyncio.Queue[Update]] = set()

    def subscribe(self) -> asyncio.Queue[Update]:
        queue: asyncio.Queue[Update] = asyncio.Queue(QUEUE_SIZE)
        self._queues.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[Update]) -> None:
        self._queues.discard(queue)

    async def stream(self) -> AsyncIterator[bytes]:
        """The updates for one page, as server-sent events, until it goes away."""
        queue = self.subscribe()
        try:
            while True:
                try:
                    yield await asyncio.wait_for(queue.get(), PING)
                except asyncio.TimeoutError:
                    yield b": ping\n\n"
        finally:
            self.unsubscribe(queue)

    def publish(self, event: str, data: Any) -> None:
        update = f"event: {event}\ndata: {json.dumps(data, default=str)}\n\n".encode()
        for queue in list(self._queues):
            if queue.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
            queue.put_nowait(update)

    async def run(self) -> None:
        """Send updates every ``interval`` until cancelled, riding out Redis outages."""
        c = self.client
        notes = NoteListener(c.url, c.keys.notify)
        notes.start()
        nodes_due = 0.0
        try:
            while True:
                await asyncio.sleep(self.interval)
                ids = notes.take()
                try:
                    if ids and self._queues:
                        self.publish("services", await rows_of(c.redis, c.keys, sorted(ids)))
                    if self._queues and time.monotonic() >= nodes_due:
                        nodes_due = time.monotonic() + self.nodes_every
                        self.publish("nodes", await c.nodes())
                except (redis.RedisError, OSError, SoafError) as e:
                    log.warning("live updates paused: %s; retrying in 1 s", e)
                    await asyncio.sleep(1.0)
                except Exception:  # whatever Redis holds, the updates go on
                    log.exception("live updates: a round failed")
                    await asyncio.sleep(1.0)
        finally:
            notes.stop()


class NoteListener:
    """The service ids noted on the notify channel, gathered by a thread of its own.

    A blocking redis-py read costs a fraction of what an asyncio one does per message,
    and a busy fleet publishes hundreds of notes a second; the event loop only takes
    the ids gathered so far, once per interval."""

    def __init__(self, url: str, channel: str) -> None:
        self.url = url
        self.channel = channel
        self._ids: set[str] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soaf-dashboard-notes",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()

    def take(self) -> set[str]:
        """The ids noted since the last call."""
        with self._lock:
            ids, self._ids = self._ids, set()
        return ids

    def _run(self) -> None:
        while not self._stopping.is_set():
            conn = connect(self.url, blocking=True, name="soaf-dashboard-notes")
            try:
                pubsub = conn.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
                pubsub.subscribe(self.channel)
                while not self._stopping.is_set():
                    message = pubsub.get_message(timeout=LISTEN_WAIT)
                    if message is not None:
                        with self._lock:
                            self._ids.update(_noted(message.get("data")))
            except (redis.RedisError, OSError) as e:
                log.warning("live updates paused: %s; retrying in 1 s", e)
                self._stopping.wait(1.0)
            finally:
                conn.close()


def _noted(data: Any) -> list[str]:
    """The service id of a notify message; nothing for anything malformed."""
    try:
        note = json.loads(data)
    except (TypeError, ValueError):
        return []
    sid = note.get("id") if isinstance(note, dict) else None
    return [sid] if isinstance(sid, str) else []
