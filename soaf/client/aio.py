"""AsyncClient: the ``Client`` calls for asyncio programs that drive many services at once.

Same methods, same arguments, same errors and the same wire contract as ``Client``
(see its docstring); every call is a coroutine, and the ones that follow services
(``as_completed``, ``follow``, ``events``, ``logs``) are async iterators. Built on
redis.asyncio, so thousands of waits share one event loop instead of one thread each.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import redis

from soaf.client.follow import READ_COUNT, STREAM_WAIT_MAX, Follow, NotifyWait, is_final, unique
from soaf.client.sync import (
    CONTROL_MAXLEN,
    LOG_POLL,
    duplicate,
    matches,
    queue_cancel,
    reload_fields,
    resolve,
    submit_call,
    unknown,
    unreachable,
)
from soaf.client.tail import OutputFile, output_path
from soaf.errors import WaitTimeout
from soaf.protocol.connection import connect_async
from soaf.protocol.scripts import SUBMIT, Script
from soaf.protocol.state import ServiceRecord, decode_event
from soaf.protocol.template import ServiceParamTemplate


class AsyncClient:
    """``Client`` for asyncio: ``async with AsyncClient() as client: ...``."""

    def __init__(
        self,
        url: str | None = None,
        *,
        secret: str | None = None,
        prefix: str | None = None,
        state_dir: str | Path | None = None,
    ) -> None:
        self.url, self.keys, self._state_dir = resolve(url, prefix, state_dir)
        self._secret = secret
        self.redis = connect_async(self.url, name="soaf-aclient")
        self._blocking = connect_async(self.url, blocking=True, name="soaf-aclient-wait")

    async def close(self) -> None:
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
            raise unreachable(self.url, e) from e

    async def _script(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        """EVALSHA, loading the script first if Redis does not know it (as Script.run)."""
        try:
            return await self.redis.evalsha(script.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            return await self.redis.eval(script.text, len(keys), *keys, *args)

    # -- submitting ---------------------------------------------------------------------

    async def submit(self, template: ServiceParamTemplate) -> str:
        """Validate, sign and queue ``template``; return its service id (see Client.submit)."""
        keys, args = submit_call(self.keys, template, self._secret, self._state_dir)
        created, detail = await self._call(self._script, SUBMIT, keys, args)
        if not created:
            raise duplicate(template.service_id, detail)
        return template.service_id

    # -- reading ------------------------------------------------------------------------

    async def status(self, service_id: str) -> ServiceRecord:
        """The current record; UnknownService if no such id was ever submitted."""
        record = await self._record_or_none(service_id)
        if record is None:
            raise unknown(service_id)
        return record

    async def _record_or_none(self, service_id: str) -> ServiceRecord | None:
        data = await self._call(self.redis.hgetall, self.keys.service(service_id))
        return ServiceRecord.from_hash(service_id, data) if data else None

    async def wait(self, service_id: str, timeout: float | None = None) -> ServiceRecord:
        """The final record, whatever the final state; WaitTimeout if not final in time."""
        async with contextlib.aclosing(self.as_completed([service_id], timeout=timeout)) as it:
            async for record in it:
                return record
        raise WaitTimeout(f"service {service_id} is not final")  # pragma: no cover

    async def wait_all(self, ids: Iterable[str], timeout: float | None = None
                       ) -> list[ServiceRecord]:
        """Wait for all ``ids``; their final records in the order of ``ids``."""
        ids = unique(ids)
        done = {r.service_id: r async for r in self.as_completed(ids, timeout=timeout)}
        return [done[i] for i in ids]

    async def as_completed(self, ids: Iterable[str], timeout: float | None = None
                           ) -> AsyncIterator[ServiceRecord]:
        """Each service's final record as it finishes; WaitTimeout for the rest.

        Many ids are followed through the notify channel, as in Client.as_completed.
        """
        ids = unique(ids)
        if len(ids) > STREAM_WAIT_MAX:
            async for record in self._as_completed_notify(ids, timeout):
                yield record
            return
        pending: list[ServiceRecord | str] = []
        for sid in ids:
            record = await self._record_or_none(sid)
            if record is not None and record.final:
                yield record
            else:
                pending.append(record if record is not None else sid)
        done: set[str] = set()
        async for sid, event in self.follow(pending, timeout=timeout):
            if is_final(event):
                done.add(sid)
                yield await self.status(sid)
        # An id whose record appeared, already final, between the first read and the
        # follow's own read is not followed at all: it is final now.
        for item in pending:
            sid = item if isinstance(item, str) else item.service_id
            if sid not in done:
                yield await self.status(sid)

    async def _states(self, ids: list[str]) -> dict[str, str | None]:
        pipe = self.redis.pipeline(transaction=False)
        for sid in ids:
            pipe.hget(self.keys.service(sid), "state")
        raw = await self._call(pipe.execute)
        return {sid: None if v is None else json.loads(v) for sid, v in zip(ids, raw)}

    async def _as_completed_notify(self, ids: list[str], timeout: float | None
                                   ) -> AsyncIterator[ServiceRecord]:
        wait = NotifyWait(ids, timeout=timeout)
        pubsub = self._blocking.pubsub(ignore_subscribe_messages=True)
        try:
            await self._call(pubsub.subscribe, self.keys.notify)  # first: nothing slips by
            while wait.pending:
                done: list[str] = []
                if wait.check_due():
                    done = wait.checked(await self._states(sorted(wait.pending)))
                else:
                    message = await self._call(pubsub.get_message,
                                               ignore_subscribe_messages=True,
                                               timeout=wait.block_s())
                    while message is not None:
                        if (sid := wait.note(message["data"])) is not None:
                            done.append(sid)
                        message = await self._call(pubsub.get_message,
                                                   ignore_subscribe_messages=True, timeout=0)
                for sid in dict.fromkeys(done):
                    wait.pending.discard(sid)
                    yield await self.status(sid)
        finally:
            await pubsub.aclose()

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
            resp = await self._call(self._blocking.xread, follow.streams(), count=READ_COUNT,
                                    block=follow.block_ms())
            for item in follow.feed(resp):
                yield item
            for sid in follow.overdue():
                exists = await self._call(self.redis.exists, self.keys.service(sid))
                follow.resolve(sid, bool(exists))

    async def events(self, service_id: str, *, follow: bool = True,
                     timeout: float | None = None) -> AsyncIterator[dict[str, Any]]:
        """Every event from the first, then live ones until final; no gap, no duplicate."""
        record = await self._record_or_none(service_id)
        if not follow or (record is not None and record.final):  # all there is, at once
            entries = await self._call(self.redis.xrange, self.keys.events(service_id))
            if not entries and record is None:
                raise unknown(service_id)
            for raw_id, data in entries:
                yield {**decode_event(data), "event_id": raw_id.decode()}
            return
        async for _, event in self.follow([record or service_id], timeout=timeout, replay=True):
            yield event

    async def logs(self, service_id: str, *, tail: int | None = None, follow: bool = False,
                   stream: str = "stdout") -> AsyncIterator[str]:
        """Lines of the program's output from its work dir (see Client.logs)."""
        record = await self.status(service_id)
        path = output_path(record, stream)
        while path is None:
            if not follow or record.final:
                return
            await asyncio.sleep(LOG_POLL)
            record = await self.status(service_id)
            path = output_path(record, stream)
        out = OutputFile(path)
        for line in out.tail(tail):
            yield line
        while follow:
            final = (await self.status(service_id)).final
            for line in out.new_lines(final=final):
                yield line
            if final:
                return
            await asyncio.sleep(LOG_POLL)

    async def list(self, *, state: str | None = None, service: str | None = None,
                   node: str | None = None, since: float | None = None,
                   limit: int = 100) -> list[ServiceRecord]:
        """The newest services first, optionally filtered (see Client.list)."""
        out: list[ServiceRecord] = []
        start = 0
        while len(out) < limit:
            ids = await self._call(self.redis.zrevrangebyscore, self.keys.services, "+inf",
                                        since if since is not None else "-inf", start=start, num=200)
            if not ids:
                break
            start += len(ids)
            pipe = self.redis.pipeline(transaction=False)
            for raw in ids:
                pipe.hgetall(self.keys.service(raw.decode()))
            for raw, data in zip(ids, await self._call(pipe.execute)):
                if data:
                    record = ServiceRecord.from_hash(raw.decode(), data)
                    if matches(record, state, service, node):
                        out.append(record)
                        if len(out) >= limit:
                            break
        return out

    # -- steering -----------------------------------------------------------------------

    async def cancel(self, service_id: str) -> str:
        """Ask for a service to be cancelled (durably); returns what happened in words."""
        record = await self.status(service_id)
        if record.final:
            return f"already {record.state}; nothing to cancel"
        pipe = self.redis.pipeline(transaction=False)
        queue_cancel(pipe, self.keys, service_id)
        await self._call(pipe.execute)
        return f"cancel requested ({record.state})"

    async def plugins(self) -> dict[str, Any]:
        """Plugin version, services and last load error of every core, by node name."""
        data = await self._call(self.redis.hgetall, self.keys.plugins)
        return {k.decode(): json.loads(v) for k, v in data.items()}

    async def nodes(self) -> list[dict[str, Any]]:
        """The cores alive now, with their load."""
        members = await self._call(self.redis.smembers, self.keys.nodes)
        names = sorted(n.decode() for n in members)
        if not names:
            return []
        values = await self._call(self.redis.mget, [self.keys.node(n) for n in names])
        return [json.loads(v) for v in values if v is not None]

    async def reload(self, node: str | None = None) -> None:
        """Ask cores (all, or one ``node``) to reload their plugins now."""
        await self._call(self.redis.xadd, self.keys.control, reload_fields(node),
                         maxlen=CONTROL_MAXLEN, approximate=True)
