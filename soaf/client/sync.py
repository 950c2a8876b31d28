"""Client: submit templates and follow, wait for and cancel services, from anywhere.

Uses only the wire contract of docs/protocol.md (it never imports the core). This
module only talks to Redis: what to send and what the replies mean is decided in
soaf/client/calls.py, follow.py, notes.py and logstream.py, shared with ``AsyncClient``.
Following reads each service's event stream from the position stored in its record, so
no event between "read the record" and "follow the stream" can be missed; waiting rides
on the notify channel, which the client subscribes to once (soaf.client.listener).

What the calls raise (all soaf errors): ``RedisUnavailable`` when Redis cannot be
reached, ``UnknownService`` for an id that was never submitted, ``WaitTimeout`` when a
wait runs out of time, ``ValidationError`` / ``DuplicateService`` from ``submit``.
A service that ends badly is not an exception: ``wait`` returns its final record
whatever the state (``failed``, ``cancelled``, ``timed_out`` and ``rejected`` - the
core refused the submission, ``record.error`` says why); check ``record.ok``.

Calls that follow (``wait``, ``wait_all``, ``as_completed``, ``follow``, ``events``,
``follow_logs`` and ``logs(follow=True)``) ride out an outage of Redis of up to
``reconnect_for`` seconds once they have started, retrying with backoff and going on
from the stream position they had, so nothing is missed; the others, and those after
that time, raise ``RedisUnavailable``. ``submit`` never retries by itself: resubmitting
the same template (same service id) is safe, and ``DuplicateService`` then means the
first try had gone through.
"""

from __future__ import annotations

import builtins
import time
from collections.abc import Iterable, Iterator
from typing import Any

import redis

from soaf.client import calls
from soaf.client.base import ClientBase
from soaf.client.calls import ListQuery, Patience
from soaf.client.follow import READ_COUNT, Follow, unique
from soaf.client.listener import Listener
from soaf.client.logstream import LogFollow, LogLine, TailRead
from soaf.client.notes import Wait, chunks, queue_reads
from soaf.client.tail import OutputFile, check_stream, local_output
from soaf.errors import RedisUnavailable
from soaf.protocol.connection import connect
from soaf.protocol.durable import replicas
from soaf.protocol.scripts import CANCEL, SUBMIT
from soaf.protocol.state import ServiceRecord
from soaf.protocol.template import ServiceParamTemplate


class Client(ClientBase["redis.Redis", Listener]):
    """A connection to the Redis that soaf cores read from.

    ``url`` and ``secret`` default to what a core on this machine uses: SOAF_REDIS_URL
    and SOAF_SECRET, else the files of the embedded core's state dir (``.soaf/``, or
    SOAF_STATE_DIR). ``max_payload`` (default SOAF_MAX_PAYLOAD) is the largest signed
    template ``submit`` sends. Safe to share between threads.
    """

    client_name = "soaf-client"

    def _connect(self, url: str, *, blocking: bool, name: str) -> redis.Redis:
        return connect(url, blocking=blocking, name=name)

    def _listen(self) -> Listener:
        return Listener(lambda: self._connect(self.url, blocking=True,
                                              name=f"{self.client_name}-notify"),
                        self.keys.notify, self.url)

    def close(self) -> None:
        self._listener.close()
        self.redis.close()
        self._blocking.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (redis.RedisError, OSError) as e:
            raise calls.unreachable(self.url, e) from e

    def _patient(self, deadline: float | None, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """``_call`` for reads that may be repeated (see ``calls.Patience``)."""
        patience = Patience(self.reconnect_for, deadline)
        while True:
            try:
                return self._call(fn, *args, **kwargs)
            except RedisUnavailable as e:
                time.sleep(patience.pause(e))

    # -- submitting ---------------------------------------------------------------------

    def submit(self, template: ServiceParamTemplate, *, require_core: bool = False,
               durable: bool | None = None) -> str:
        """Validate, sign and queue ``template``; return its service id.

        Everything a core would refuse is refused here first: ValidationError naming a
        bad field (or ``payload`` when it is over ``max_payload``), UnsafePayload naming a
        global the core will not load; DuplicateService when the id was already submitted.
        A service no live core offers is queued until one does (its record's
        ``waiting_for`` says so); ``require_core=True`` raises NoCoreOffers instead.
        ``durable`` (default SOAF_DURABLE_SUBMIT): return only once SOAF_DURABLE_REPLICAS
        replicas hold the submission (NotReplicated otherwise; see docs/delivery.md).
        """
        keys, args = calls.submit_call(self._target, template, self._secret, require_core)
        self._listener.expect(template.service_id)  # before the record exists
        try:
            if wanted := replicas(durable):
                pipe = self.redis.pipeline(transaction=False)
                calls.queue_durable(pipe, SUBMIT, keys, args, wanted)
                return calls.durably_submitted(template, self._call(pipe.execute), wanted)
            return calls.submitted(template, self._call(SUBMIT.run, self.redis, keys, args))
        except BaseException:
            self._listener.forget(template.service_id)
            raise

    def resubmit(self, service_id: str) -> str:
        """Submit the template ``service_id`` was submitted with again, under a new id;
        return that id. The signed payload ``submit`` keeps beside each record is read
        back and verified (ClientError when none is kept)."""
        payload = self._call(self.redis.get, self.keys.payload(service_id))
        return self.submit(calls.resubmitted(self._target, service_id, payload, self._secret))

    # -- reading ------------------------------------------------------------------------

    def status(self, service_id: str) -> ServiceRecord:
        """The current record; UnknownService if no such id was ever submitted."""
        record = self._record_or_none(service_id)
        if record is None:
            raise calls.unknown(service_id)
        return record

    def _record_or_none(self, service_id: str) -> ServiceRecord | None:
        # Not patient: a first read fails fast (status, the CLI); following, once
        # started, rides out an outage (see follow()).
        return calls.record_from(
            service_id, self._call(self.redis.hgetall, self.keys.service(service_id)))

    def wait(self, service_id: str, timeout: float | None = None) -> ServiceRecord:
        """Block until the service is final and return its record, whatever the final state.

        WaitTimeout if it is not final within ``timeout`` seconds; UnknownService if the
        id has no record (after a short grace, see ``soaf.client.follow.UNKNOWN_GRACE``).
        """
        return self.wait_all([service_id], timeout=timeout)[0]

    def wait_all(self, ids: Iterable[str], timeout: float | None = None) -> list[ServiceRecord]:
        """Wait for all ``ids``; their final records in the order of ``ids``."""
        ids = unique(ids)
        done = {r.service_id: r for r in self.as_completed(ids, timeout=timeout)}
        return [done[i] for i in ids]

    def as_completed(
        self, ids: Iterable[str], timeout: float | None = None
    ) -> Iterator[ServiceRecord]:
        """Yield each service's final record as it finishes; WaitTimeout for the rest.

        Rides on the notify channel, whatever the number of ids: the records are read
        once, then only those whose final state is announced (see soaf.client.notes).
        """
        wait = Wait(ids, timeout=timeout, reconnect_for=self.reconnect_for)
        self._listener.join(wait)
        try:
            while wait.pending:
                task = self._listener.next_task(wait)
                replies = []
                for chunk in chunks(task.ids):
                    replies += self._patient(wait.deadline, self._read, chunk, task.states)
                yield from self._listener.settle(wait, task, replies)
        finally:
            self._listener.leave(wait)

    def _read(self, ids: list[str], states: bool) -> list[Any]:
        pipe = self.redis.pipeline(transaction=False)
        queue_reads(pipe, self.keys, ids, states=states)
        return pipe.execute()

    def follow(
        self, services: Iterable[str | ServiceRecord], *, timeout: float | None = None,
        replay: bool = False,
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """``(id, event)`` for every event of these services, until each one is final.

        A record given (rather than an id) is followed from the moment it was read, so
        a caller that shows records and then follows them misses nothing; an id is
        followed from its record as read now. Without ``replay`` a service that is
        already final yields nothing. WaitTimeout after ``timeout`` seconds.
        """
        follow = Follow(self.keys, timeout=timeout)
        for item in services:
            if isinstance(item, ServiceRecord):
                follow.add(item.service_id, item, replay=replay)
            else:
                follow.add(item, self._record_or_none(item), replay=replay)
        while follow.active:
            resp = self._patient(follow.deadline, self._blocking.xread, follow.streams(),
                                 count=READ_COUNT, block=follow.block_ms())
            yield from follow.feed(resp)
            for sid in follow.overdue():
                follow.resolve(sid, bool(self._call(self.redis.exists, self.keys.service(sid))))

    def events(
        self, service_id: str, *, follow: bool = True, timeout: float | None = None
    ) -> Iterator[dict[str, Any]]:
        """Every event of the service from the first, then live ones until it is final.

        Replay and live reading are one stream read, so there is neither a gap nor a
        duplicate between them. Stops after the final event (or, when ``follow`` is
        False, once the past is replayed); WaitTimeout after ``timeout`` seconds.
        """
        record = self._record_or_none(service_id)
        if not follow or (record is not None and record.final):  # all there is, at once
            entries = self._call(self.redis.xrange, self.keys.events(service_id))
            yield from calls.events_from(service_id, record, entries)
            return
        for _, event in self.follow([record or service_id], timeout=timeout, replay=True):
            yield event

    def list(
        self, *, state: str | None = None, service: str | None = None, node: str | None = None,
        since: float | None = None, limit: int = 100,
    ) -> list[ServiceRecord]:
        """The newest services first, optionally only those in ``state``, of ``service``,
        on ``node``, or submitted at or after ``since`` (a ``time.time()`` value)."""
        query = ListQuery(state=state, service=service, node=node, since=since, limit=limit)
        while (page := query.page()) is not None:
            low, start, num = page
            ids = self._call(self.redis.zrevrangebyscore, self.keys.services, "+inf", low,
                             start=start, num=num)
            pipe = self.redis.pipeline(transaction=False)
            for raw in ids:
                pipe.hgetall(self.keys.service(raw.decode()))
            query.feed(ids, self._call(pipe.execute) if ids else [])
        return query.found

    # -- logs ---------------------------------------------------------------------------

    def logs(
        self, service_id: str, *, tail: int | None = None, follow: bool = False,
        stream: str = "stdout",
    ) -> Iterator[str]:
        """The text of the program's ``stdout`` (or ``stderr``), line by line.

        Read from the service's Redis log stream, so it works from any machine (Redis
        keeps the newest ``SOAF_LOG_LINES`` lines; see ``log_lines``). Only when Redis
        has no copy of the service's output at all, and its work dir is on this host,
        the work-dir file is read instead (a capped file's punched head is skipped,
        never shown as NUL bytes). ``tail`` keeps only the last lines; ``follow`` goes on
        yielding new lines until the service is final (always from Redis).
        UnknownService if no such id was ever submitted.
        """
        check_stream(stream)
        record = self.status(service_id)
        if follow and not record.final:
            for line in self._follow_log(record, tail, [stream], None):
                yield line.text
            return
        read = self._tail(service_id, tail, [stream])
        path = local_output(record, stream) if read.newest == "0-0" else None
        yield from (OutputFile(path).tail(tail) if path is not None
                    else [line.text for line in read.lines])

    def log_lines(self, service_id: str, *, tail: int = 100,
                  streams: Iterable[str] | None = None) -> builtins.list[LogLine]:
        """The last ``tail`` lines of the service's output, oldest first, from Redis.

        Works from any machine; soaf keeps the newest ``SOAF_LOG_LINES`` lines of each
        service there (the capped files in the work dir hold more, on the core's host).
        ``streams`` selects ``stdout``/``stderr``/``soaf`` (soaf's notes, e.g. how much
        of a flood was not copied); default all. UnknownService if no such id was ever
        submitted.
        """
        self.status(service_id)
        return self._tail(service_id, tail, streams).lines

    def follow_logs(self, service_id: str, *, tail: int = 10,
                    streams: Iterable[str] | None = None,
                    timeout: float | None = None) -> Iterator[LogLine]:
        """The last ``tail`` lines from Redis (as ``log_lines``), then each new line as it
        is copied there, until the service is final (every line written before the end
        is yielded). WaitTimeout after ``timeout`` seconds."""
        yield from self._follow_log(self.status(service_id), tail, streams, timeout)

    def _tail(self, service_id: str, n: int | None, streams: Iterable[str] | None
              ) -> TailRead:
        read = TailRead(n, streams)
        while (request := read.request()) is not None:
            top, count = request
            read.feed(self._call(self.redis.xrevrange, self.keys.log(service_id), max=top,
                                 min="-", count=count))
        return read

    def _follow_log(self, record: ServiceRecord, tail: int | None,
                    streams: Iterable[str] | None, timeout: float | None
                    ) -> Iterator[LogLine]:
        read = self._tail(record.service_id, tail, streams)
        yield from read.lines
        follow = LogFollow(self.keys, record, position=read.newest, streams=streams,
                           timeout=timeout)
        while not follow.final:
            yield from follow.feed(self._patient(
                follow.deadline, self._blocking.xread, follow.streams(), count=READ_COUNT,
                block=follow.block_ms()))
        while entries := self._patient(None, self.redis.xrange, follow.log_key,
                                       min=follow.after(), count=READ_COUNT):
            yield from follow.feed_log(entries)

    # -- steering -----------------------------------------------------------------------

    def cancel(self, service_id: str) -> str:
        """Cancel a service; returns what happened in plain words.

        A queued service (no core holds it) is ``cancelled`` at once and never starts.
        For one a core holds, the request is recorded in Redis and announced to the
        cores; it is durable: the core running it applies it within a heartbeat, and a
        core that takes it over later finds it. A finished service is left as it is
        (the answer says so); an unknown id raises UnknownService.
        """
        keys, args = calls.cancel_call(self._target, service_id, self._secret)
        return calls.cancelled(service_id, self._call(CANCEL.run, self.redis, keys, args))

    def plugins(self) -> dict[str, Any]:
        """Plugin version, services and last load error of every core, by node name."""
        return calls.plugins_from(self._call(self.redis.hgetall, self.keys.plugins))

    def nodes(self) -> builtins.list[dict[str, Any]]:
        """The cores alive now (their heartbeat has not expired), with their load."""
        names = calls.node_names(self._call(self.redis.smembers, self.keys.nodes))
        if not names:
            return []
        return calls.nodes_from(self._call(self.redis.mget, [self.keys.node(n) for n in names]))

    def services(self) -> builtins.list[dict[str, Any]]:
        """Per service name: the live cores that offer it, and how many entries wait in
        its queues and how many cores hold (see ``calls.services_from``)."""
        queues = calls.queues_from(self._call(self.redis.smembers, self.keys.queues))
        pipe = self.redis.pipeline(transaction=False)
        calls.count_queues(pipe, self.keys, queues)
        counts = self._call(pipe.execute, raise_on_error=False)
        return calls.services_from(self.nodes(), queues, counts)

    def reload(self, node: str | None = None) -> None:
        """Ask cores (all, or one ``node``) to reload their plugins now."""
        stream, fields, maxlen = calls.reload_call(self._target, node, self._secret)
        self._call(self.redis.xadd, stream, fields, maxlen=maxlen, approximate=True)
