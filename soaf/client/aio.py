"""AsyncClient: the ``Client`` calls for asyncio programs that drive many services at once.

Same methods, same parameters, same errors and the same meaning as ``Client`` (see
soaf/client/sync.py; tests/test_client_parity.py holds them to it): every call is a
coroutine, and the ones that return an iterator there (``as_completed``, ``follow``,
``events``, ``logs``, ``follow_logs``) are async iterators here. What is sent and what
the replies mean comes from the same sans-I/O modules (calls.py, follow.py,
logstream.py); this one only awaits. Built on redis.asyncio, so thousands of waits
share one event loop instead of one thread each.
"""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING, Any

import redis

from soaf.client import calls
from soaf.client.base import ClientBase
from soaf.client.calls import ListQuery, Patience
from soaf.client.follow import READ_COUNT, Follow, unique
from soaf.client.listener import AsyncListener
from soaf.client.logstream import LogFollow, LogLine, TailRead
from soaf.client.notes import Wait, chunks, queue_reads
from soaf.client.tail import OutputFile, check_stream, local_output
from soaf.errors import RedisUnavailable
from soaf.protocol.connection import connect_async
from soaf.protocol.durable import replicas
from soaf.protocol.scripts import CANCEL, SUBMIT, Script
from soaf.protocol.state import ServiceRecord
from soaf.protocol.template import ServiceParamTemplate

if TYPE_CHECKING:
    import redis.asyncio


class AsyncClient(ClientBase["redis.asyncio.Redis", AsyncListener]):
    """``Client`` for asyncio: ``async with AsyncClient() as client: ...``.

    Safe to share between the tasks of one event loop."""

    client_name = "soaf-aclient"

    def _connect(self, url: str, *, blocking: bool, name: str) -> redis.asyncio.Redis:
        return connect_async(url, blocking=blocking, name=name)

    def _listen(self) -> AsyncListener:
        return AsyncListener(lambda: self._connect(self.url, blocking=True,
                                                   name=f"{self.client_name}-notify"),
                             self.keys.notify, self.url)

    async def close(self) -> None:
        await self._listener.close()
        await self.redis.aclose()
        await self._blocking.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except (redis.RedisError, OSError) as e:
            raise calls.unreachable(self.url, e) from e

    async def _patient(self, deadline: float | None, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """``_call`` for reads that may be repeated (see ``calls.Patience``)."""
        patience = Patience(self.reconnect_for, deadline)
        while True:
            try:
                return await self._call(fn, *args, **kwargs)
            except RedisUnavailable as e:
                await asyncio.sleep(patience.pause(e))

    async def _script(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        """EVALSHA, loading the script first if Redis does not know it (as Script.run)."""
        async def run() -> Any:
            try:
                return await self.redis.evalsha(script.sha, len(keys), *keys, *args)
            except redis.exceptions.NoScriptError:
                return await self.redis.eval(script.text, len(keys), *keys, *args)
        return await self._call(run)

    # -- submitting ---------------------------------------------------------------------

    async def submit(self, template: ServiceParamTemplate, *, require_core: bool = False,
                     durable: bool | None = None) -> str:
        """Validate, sign and queue ``template``; return its service id (see Client.submit)."""
        keys, args = calls.submit_call(self._target, template, self._secret, require_core)
        self._listener.expect(template.service_id)  # before the record exists
        try:
            if wanted := replicas(durable):
                pipe = self.redis.pipeline(transaction=False)
                calls.queue_durable(pipe, SUBMIT, keys, args, wanted)
                results = await self._call(pipe.execute)
                return calls.durably_submitted(template, results, wanted)
            return calls.submitted(template, await self._script(SUBMIT, keys, args))
        except BaseException:
            self._listener.forget(template.service_id)
            raise

    async def resubmit(self, service_id: str) -> str:
        """Submit ``service_id``'s template again under a new id (see Client.resubmit)."""
        payload = await self._call(self.redis.get, self.keys.payload(service_id))
        return await self.submit(calls.resubmitted(self._target, service_id, payload,
                                                   self._secret))

    # -- reading ------------------------------------------------------------------------

    async def status(self, service_id: str) -> ServiceRecord:
        """The current record; UnknownService if no such id was ever submitted."""
        record = await self._record_or_none(service_id)
        if record is None:
            raise calls.unknown(service_id)
        return record

    async def _record_or_none(self, service_id: str) -> ServiceRecord | None:
        return calls.record_from(
            service_id, await self._call(self.redis.hgetall, self.keys.service(service_id)))

    async def wait(self, service_id: str, timeout: float | None = None) -> ServiceRecord:
        """The final record, whatever the final state (see Client.wait)."""
        return (await self.wait_all([service_id], timeout=timeout))[0]

    async def wait_all(self, ids: Iterable[str], timeout: float | None = None
                       ) -> list[ServiceRecord]:
        """Wait for all ``ids``; their final records in the order of ``ids``."""
        ids = unique(ids)
        done = {r.service_id: r async for r in self.as_completed(ids, timeout=timeout)}
        return [done[i] for i in ids]

    async def as_completed(self, ids: Iterable[str], timeout: float | None = None
                           ) -> AsyncIterator[ServiceRecord]:
        """Each service's final record as it finishes (see Client.as_completed)."""
        wait = Wait(ids, timeout=timeout, reconnect_for=self.reconnect_for)
        self._listener.join(wait)
        try:
            while wait.pending:
                task = await self._listener.next_task(wait)
                replies = []
                for chunk in chunks(task.ids):
                    replies += await self._patient(wait.deadline, self._read, chunk,
                                                   task.states)
                for record in self._listener.settle(wait, task, replies):
                    yield record
        finally:
            self._listener.leave(wait)

    async def _read(self, ids: list[str], states: bool) -> list[Any]:
        pipe = self.redis.pipeline(transaction=False)
        queue_reads(pipe, self.keys, ids, states=states)
        return await pipe.execute()

    async def follow(
        self, services: Iterable[str | ServiceRecord], *, timeout: float | None = None,
        replay: bool = False,
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """``(id, event)`` for every event of these services until each is final
        (see Client.follow)."""
        follow = Follow(self.keys, timeout=timeout)
        for item in services:
            if isinstance(item, ServiceRecord):
                follow.add(item.service_id, item, replay=replay)
            else:
                follow.add(item, await self._record_or_none(item), replay=replay)
        while follow.active:
            resp = await self._patient(follow.deadline, self._blocking.xread, follow.streams(),
                                       count=READ_COUNT, block=follow.block_ms())
            for got in follow.feed(resp):
                yield got
            for sid in follow.overdue():
                exists = await self._call(self.redis.exists, self.keys.service(sid))
                follow.resolve(sid, bool(exists))

    async def events(self, service_id: str, *, follow: bool = True,
                     timeout: float | None = None) -> AsyncIterator[dict[str, Any]]:
        """Every event from the first, then live ones until final (see Client.events)."""
        record = await self._record_or_none(service_id)
        if not follow or (record is not None and record.final):  # all there is, at once
            entries = await self._call(self.redis.xrange, self.keys.events(service_id))
            for event in calls.events_from(service_id, record, entries):
                yield event
            return
        async for _, event in self.follow([record or service_id], timeout=timeout, replay=True):
            yield event

    async def list(self, *, state: str | None = None, service: str | None = None,
                   node: str | None = None, since: float | None = None,
                   limit: int = 100) -> list[ServiceRecord]:
        """The newest services first, optionally filtered (see Client.list)."""
        query = ListQuery(state=state, service=service, node=node, since=since, limit=limit)
        while (page := query.page()) is not None:
            low, start, num = page
            ids = await self._call(self.redis.zrevrangebyscore, self.keys.services, "+inf",
                                   low, start=start, num=num)
            pipe = self.redis.pipeline(transaction=False)
            for raw in ids:
                pipe.hgetall(self.keys.service(raw.decode()))
            query.feed(ids, await self._call(pipe.execute) if ids else [])
        return query.found

    # -- logs ---------------------------------------------------------------------------

    async def logs(self, service_id: str, *, tail: int | None = None, follow: bool = False,
                   stream: str = "stdout") -> AsyncIterator[str]:
        """The text of the program's output, from Redis; the work-dir file only when
        Redis has no copy and the work dir is on this host (see Client.logs)."""
        check_stream(stream)
        record = await self.status(service_id)
        if follow and not record.final:
            async for line in self._follow_log(record, tail, [stream], None):
                yield line.text
            return
        read = await self._tail(service_id, tail, [stream])
        path = local_output(record, stream) if read.newest == "0-0" else None
        for text in (OutputFile(path).tail(tail) if path is not None
                     else [line.text for line in read.lines]):
            yield text

    async def log_lines(self, service_id: str, *, tail: int = 100,
                        streams: Iterable[str] | None = None) -> builtins.list[LogLine]:
        """The last ``tail`` lines of the output, oldest first, from Redis
        (see Client.log_lines)."""
        await self.status(service_id)
        return (await self._tail(service_id, tail, streams)).lines

    async def follow_logs(self, service_id: str, *, tail: int = 10,
                          streams: Iterable[str] | None = None,
                          timeout: float | None = None) -> AsyncIterator[LogLine]:
        """The last ``tail`` lines, then each new one, until the service is final
        (see Client.follow_logs)."""
        async for line in self._follow_log(await self.status(service_id), tail, streams,
                                           timeout):
            yield line

    async def _tail(self, service_id: str, n: int | None, streams: Iterable[str] | None
                    ) -> TailRead:
        read = TailRead(n, streams)
        while (request := read.request()) is not None:
            top, count = request
            read.feed(await self._call(self.redis.xrevrange, self.keys.log(service_id),
                                       max=top, min="-", count=count))
        return read

    async def _follow_log(self, record: ServiceRecord, tail: int | None,
                          streams: Iterable[str] | None, timeout: float | None
                          ) -> AsyncIterator[LogLine]:
        read = await self._tail(record.service_id, tail, streams)
        for line in read.lines:
            yield line
        follow = LogFollow(self.keys, record, position=read.newest, streams=streams,
                           timeout=timeout)
        while not follow.final:
            for line in follow.feed(await self._patient(
                    follow.deadline, self._blocking.xread, follow.streams(), count=READ_COUNT,
                    block=follow.block_ms())):
                yield line
        while entries := await self._patient(None, self.redis.xrange, follow.log_key,
                                             min=follow.after(), count=READ_COUNT):
            for line in follow.feed_log(entries):
                yield line

    # -- steering -----------------------------------------------------------------------

    async def cancel(self, service_id: str) -> str:
        """Cancel a service; what happened in plain words (see Client.cancel): a queued
        one is ``cancelled`` at once, for one a core holds a durable request is made."""
        keys, args = calls.cancel_call(self._target, service_id, self._secret)
        return calls.cancelled(service_id, await self._script(CANCEL, keys, args))

    async def plugins(self) -> dict[str, Any]:
        """Plugin version, services and last load error of every core, by node name."""
        return calls.plugins_from(await self._call(self.redis.hgetall, self.keys.plugins))

    async def nodes(self) -> builtins.list[dict[str, Any]]:
        """The cores alive now (their heartbeat has not expired), with their load."""
        names = calls.node_names(await self._call(self.redis.smembers, self.keys.nodes))
        if not names:
            return []
        return calls.nodes_from(
            await self._call(self.redis.mget, [self.keys.node(n) for n in names]))

    async def services(self) -> builtins.list[dict[str, Any]]:
        """Per service name: the live cores that offer it, and how many entries wait in
        its queues and how many cores hold (see ``calls.services_from``)."""
        queues = calls.queues_from(await self._call(self.redis.smembers, self.keys.queues))
        pipe = self.redis.pipeline(transaction=False)
        calls.count_queues(pipe, self.keys, queues)
        counts = await self._call(pipe.execute, raise_on_error=False)
        return calls.services_from(await self.nodes(), queues, counts)

    async def reload(self, node: str | None = None) -> None:
        """Ask cores (all, or one ``node``) to reload their plugins now."""
        stream, fields, maxlen = calls.reload_call(self._target, node, self._secret)
        await self._call(self.redis.xadd, stream, fields, maxlen=maxlen, approximate=True)
