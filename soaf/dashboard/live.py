"""Hub: live updates for every open page through one subscription per dashboard process.

Cores publish a short note on ``soaf:notify`` for every event (docs/protocol.md). The hub
alone subscribes; it gathers the ids noted during ``interval`` seconds, reads their rows
once (one pipeline) and hands the same update, encoded once as a server-sent event, to
every open page's queue, so a hundred browsers cost one Redis read and one encoding per
interval, not a hundred. Every ``nodes_every``
seconds it also reads the cores' heartbeats for the fleet page. A page whose queue is
full (a stalled browser) loses its oldest updates, never blocks the others; pub/sub is
at-most-once anyway, and a reload shows the truth.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import redis
import redis.asyncio

from soaf.client.aio import AsyncClient
from soaf.dashboard.listing import rows_of
from soaf.protocol.connection import connect_async

log = logging.getLogger(__name__)

#: Seconds between two updates sent to pages (changes in between are merged).
INTERVAL = 0.25
#: Seconds between two reads of the cores' heartbeats.
NODES_EVERY = 2.0
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
        #: Updates sent, for tests and the bench.
        self.sent = 0

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

    @property
    def listeners(self) -> int:
        return len(self._queues)

    def publish(self, event: str, data: Any) -> None:
        update = f"event: {event}\ndata: {json.dumps(data, default=str)}\n\n".encode()
        for queue in list(self._queues):
            if queue.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
            queue.put_nowait(update)
        self.sent += 1

    async def run(self) -> None:
        """Follow the notify channel until cancelled, riding out Redis outages."""
        while True:
            try:
                await self._follow()
            except asyncio.CancelledError:
                raise
            except (redis.RedisError, OSError) as e:
                log.warning("live updates paused: %s; retrying in 1 s", e)
                await asyncio.sleep(1.0)

    async def _follow(self) -> None:
        c = self.client
        conn = connect_async(c.url, blocking=True, name="soaf-dashboard-live")
        pubsub = conn.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(c.keys.notify)
            nodes_due = 0.0
            while True:
                ids: set[str] = set()
                deadline = time.monotonic() + self.interval
                while (left := deadline - time.monotonic()) > 0:
                    message = await pubsub.get_message(timeout=left)
                    if message is not None:
                        ids.update(_noted(message.get("data")))
                if ids and self._queues:
                    self.publish("services", await rows_of(c.redis, c.keys, sorted(ids)))
                if self._queues and time.monotonic() >= nodes_due:
                    nodes_due = time.monotonic() + self.nodes_every
                    self.publish("nodes", await c.nodes())
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]
            await conn.aclose()


def _noted(data: Any) -> list[str]:
    """The service id of a notify message; nothing for anything malformed."""
    try:
        note = json.loads(data)
    except (TypeError, ValueError):
        return []
    sid = note.get("id") if isinstance(note, dict) else None
    return [sid] if isinstance(sid, str) else []
