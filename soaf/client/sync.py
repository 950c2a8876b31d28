"""Client: submit templates and follow, wait for and cancel services, from anywhere.

Uses only the wire contract of docs/protocol.md (it never imports the core). Waiting
reads each service's event stream from the position stored in its record, so no event
between "read the record" and "follow the stream" can be missed (see soaf/client/follow.py).

What the calls raise (all soaf errors): ``RedisUnavailable`` when Redis cannot be
reached, ``UnknownService`` for an id that was never submitted, ``WaitTimeout`` when a
wait runs out of time, ``ValidationError`` / ``DuplicateService`` from ``submit``.
A service that ends badly is not an exception: ``wait`` returns its final record
whatever the state (``failed``, ``cancelled``, ``timed_out`` and ``rejected`` - the
core refused the submission, ``record.error`` says why); check ``record.ok``.

Calls that only read (``wait``, ``wait_all``, ``as_completed``, ``events``) ride out an
outage of Redis of up to ``reconnect_for`` seconds, retrying with backoff and going on
from the stream position they had, so nothing is missed; the others, and those after
that time, raise ``RedisUnavailable``. ``submit`` never retries by itself: resubmitting
the same template (same service id) is safe, and ``DuplicateService`` then means the
first try had gone through.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import redis

from soaf.client import logstream
from soaf.client.follow import READ_COUNT, STREAM_WAIT_MAX, Follow, NotifyWait, is_final, unique
from soaf.client.logstream import LogLine
from soaf.client.payload import signing_secret
from soaf.client.tail import OutputFile, output_path
from soaf.config import find_redis_url, state_dir_from_env
from soaf.errors import (
    ConfigError,
    DuplicateService,
    RedisUnavailable,
    StateError,
    UnknownService,
    ValidationError,
    WaitTimeout,
)
from soaf.protocol.codec import DEFAULT_MAX_PAYLOAD, check_loadable, dumps
from soaf.protocol.connection import connect, redact
from soaf.protocol.keys import DEFAULT_PREFIX, Keys
from soaf.protocol.scripts import CANCEL, SUBMIT
from soaf.protocol.state import EVENTS_MAXLEN, FINAL_VALUES, ServiceRecord, decode_event
from soaf.protocol.template import ServiceParamTemplate, validate_template

#: Longest single blocking read, in milliseconds; waits are made of such reads.
_BLOCK_MS = 2000
#: Waits on more ids than this follow the notify channel instead of event streams.
_STREAM_WAIT_MAX = 16
#: Seconds between re-reads of the records while following the notify channel.
_RECHECK_S = 2.0
#: Seconds a waiting call keeps retrying while Redis cannot be reached.
DEFAULT_RECONNECT_FOR = 30.0
#: Control messages kept in the control stream (approximate).
CONTROL_MAXLEN = 10_000
#: Seconds between two looks at a followed output file.
LOG_POLL = 0.2


# -- shared with AsyncClient ----------------------------------------------------------------

def resolve(url: str | None, prefix: str | None, state_dir: str | Path | None
            ) -> tuple[str, Keys, Path]:
    """The Redis URL, key names and state dir a client uses, found like a core finds them."""
    state = Path(state_dir) if state_dir is not None else state_dir_from_env()
    found = url or find_redis_url(state)
    if not found:
        raise ConfigError(
            "no Redis to talk to: set SOAF_REDIS_URL (or pass --redis / url=), or run "
            f"next to a core with an embedded Redis (looked for {state / 'redis.url'})"
        )
    return found, Keys(prefix or os.environ.get("SOAF_PREFIX") or DEFAULT_PREFIX), state


def unreachable(url: str, e: Exception) -> StateError:
    """The soaf error for a redis-py error: RedisUnavailable for connection trouble."""
    if isinstance(e, (redis.ConnectionError, redis.TimeoutError, OSError)):
        return RedisUnavailable(f"cannot reach Redis at {redact(url)}: {e}")
    return StateError(f"Redis at {redact(url)} refused a command: {e}")


def submit_call(keys: Keys, template: ServiceParamTemplate, secret: str | None,
                state_dir: Path, max_payload: int = DEFAULT_MAX_PAYLOAD
                ) -> tuple[list[str], list[Any]]:
    """Check, sign and check again what a core would refuse (ValidationError naming a
    bad field, or ``payload`` when over the size limit; UnsafePayload naming a global
    the core will not load); KEYS and ARGV of the SUBMIT script that queues it."""
    validate_template(template)
    payload = dumps(template, signing_secret(secret, state_dir))
    if len(payload) > max_payload:
        raise ValidationError("payload", f"the template pickles to {len(payload)} bytes, over "
                                         f"the limit of {max_payload} (SOAF_MAX_PAYLOAD)")
    check_loadable(payload)
    sid = template.service_id
    return ([keys.service(sid), keys.events(sid), keys.services, keys.submit],
            [sid, template.service, time.time(), payload, keys.notify, EVENTS_MAXLEN])


def duplicate(service_id: str, detail: bytes) -> DuplicateService:
    state = detail.decode(errors="replace").strip('"')
    return DuplicateService(f"service id {service_id!r} was already submitted (state {state})")


def matches(record: ServiceRecord, state: str | None, service: str | None,
            node: str | None) -> bool:
    return ((state is None or record.state == state)
            and (service is None or record.service == service)
            and (node is None or record.node == node))


def reload_fields(node: str | None) -> dict[str, str]:
    return {"type": "reload", **({"node": node} if node else {})}


def unknown(service_id: str) -> UnknownService:
    return UnknownService(f"no service with id {service_id!r}")


def queue_cancel(pipe: Any, keys: Keys, service_id: str) -> None:
    """Add a durable cancel request (the cancels hash) and its prompt notice (the control
    stream) to a pipeline, sync or async."""
    pipe.hset(keys.cancels, service_id, json.dumps(time.time()))
    pipe.xadd(keys.control, {"type": "cancel", "id": service_id},
              maxlen=CONTROL_MAXLEN, approximate=True)


class Client:
    """A connection to the Redis that soaf cores read from.

    ``url`` and ``secret`` default to what a core on this machine uses: SOAF_REDIS_URL
    and SOAF_SECRET, else the files of the embedded core's state dir (``.soaf/``, or
    SOAF_STATE_DIR). Safe to share between threads.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        secret: str | None = None,
        prefix: str | None = None,
        state_dir: str | Path | None = None,
        reconnect_for: float = DEFAULT_RECONNECT_FOR,
        max_payload: int | None = None,
    ) -> None:
        self.url, self.keys, self._state_dir = resolve(url, prefix, state_dir)
        self._secret = secret
        self.reconnect_for = reconnect_for
        env_max = os.environ.get("SOAF_MAX_PAYLOAD", "").strip()
        try:
            self.max_payload = max_payload or (int(env_max) if env_max else DEFAULT_MAX_PAYLOAD)
        except ValueError:
            raise ConfigError(f"SOAF_MAX_PAYLOAD must be an integer, got {env_max!r}")
        self.redis = connect(self.url, name="soaf-client")
        self._blocking = connect(self.url, blocking=True, name="soaf-client-wait")

    def close(self) -> None:
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
            raise unreachable(self.url, e) from e

    def _patient(self, deadline: float | None, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """``_call`` for reads that may be repeated: retries for up to ``reconnect_for``
        seconds of unreachable Redis (never past ``deadline``), then raises."""
        failing_since: float | None = None
        pause = 0.1
        while True:
            try:
                return self._call(fn, *args, **kwargs)
            except RedisUnavailable:
                now = time.monotonic()
                failing_since = failing_since or now
                left = self.reconnect_for - (now - failing_since)
                if deadline is not None:
                    left = min(left, deadline - now)
                if left <= 0:
                    raise
                time.sleep(min(pause, left))
                pause = min(pause * 2, 2.0)

    # -- submitting ---------------------------------------------------------------------

    def submit(self, template: ServiceParamTemplate) -> str:
        """Validate, sign and queue ``template``; return its service id.

        Everything a core would refuse is refused here first: ValidationError naming a
        bad field (or ``payload`` when it is over the size limit), UnsafePayload naming a
        global the core will not load; DuplicateService when the id was already submitted.
        """
        keys, args = submit_call(self.keys, template, self._secret, self._state_dir,
                                 self.max_payload)
        created, detail = self._call(SUBMIT.run, self.redis, keys, args)
        if not created:
            raise duplicate(template.service_id, detail)
        return template.service_id

    # -- reading ------------------------------------------------------------------------

    def status(self, service_id: str) -> ServiceRecord:
        """The current record; UnknownService if no such id was ever submitted."""
        record = self._record_or_none(service_id)
        if record is None:
            raise unknown(service_id)
        return record

    def _record_or_none(self, service_id: str) -> ServiceRecord | None:
        # Not patient: a first read fails fast (status, the CLI); following, once
        # started, rides out an outage (see follow()).
        data = self._call(self.redis.hgetall, self.keys.service(service_id))
        return ServiceRecord.from_hash(service_id, data) if data else None

    def wait(self, service_id: str, timeout: float | None = None) -> ServiceRecord:
        """Block until the service is final and return its record, whatever the final state.

        WaitTimeout if it is not final within ``timeout`` seconds; UnknownService if the
        id has no record (after a short grace, see ``soaf.client.follow.UNKNOWN_GRACE``).
        """
        for record in self.as_completed([service_id], timeout=timeout):
            return record
        raise WaitTimeout(f"service {service_id} is not final")  # pragma: no cover

    def wait_all(self, ids: Iterable[str], timeout: float | None = None) -> list[ServiceRecord]:
        """Wait for all ``ids``; their final records in the order of ``ids``."""
        ids = unique(ids)
        done = {r.service_id: r for r in self.as_completed(ids, timeout=timeout)}
        return [done[i] for i in ids]

    def as_completed(
        self, ids: Iterable[str], timeout: float | None = None
    ) -> Iterator[ServiceRecord]:
        """Yield each service's final record as it finishes; WaitTimeout for the rest.

        A few ids are followed through their event streams (nothing can be missed);
        many ids through the notify channel, re-checked every few seconds because
        pub/sub drops messages while a connection is down.
        """
        ids = unique(ids)
        if len(ids) > STREAM_WAIT_MAX:
            yield from self._as_completed_notify(ids, timeout)
            return
        pending: list[ServiceRecord | str] = []
        for sid in ids:
            record = self._record_or_none(sid)
            if record is not None and record.final:
                yield record
            else:
                pending.append(record if record is not None else sid)
        done: set[str] = set()
        for sid, event in self.follow(pending, timeout=timeout):
            if is_final(event):
                done.add(sid)
                yield self.status(sid)
        # An id whose record appeared, already final, between the first read and the
        # follow's own read is not followed at all: it is final now.
        for item in pending:
            sid = item if isinstance(item, str) else item.service_id
            if sid not in done:
                yield self.status(sid)

    def _states(self, ids: list[str]) -> dict[str, str | None]:
        pipe = self.redis.pipeline(transaction=False)
        for sid in ids:
            pipe.hget(self.keys.service(sid), "state")
        raw = self._call(pipe.execute)
        return {sid: None if v is None else json.loads(v) for sid, v in zip(ids, raw)}

    def _as_completed_notify(self, ids: list[str], timeout: float | None
                             ) -> Iterator[ServiceRecord]:
        wait = NotifyWait(ids, timeout=timeout)
        pubsub = self._blocking.pubsub(ignore_subscribe_messages=True)
        try:
            self._call(pubsub.subscribe, self.keys.notify)  # first, so nothing slips by
            while wait.pending:
                done: list[str] = []
                if wait.check_due():
                    done = wait.checked(self._states(sorted(wait.pending)))
                else:
                    message = self._call(pubsub.get_message, timeout=wait.block_s())
                    while message is not None:
                        if (sid := wait.note(message["data"])) is not None:
                            done.append(sid)
                        message = self._call(pubsub.get_message, timeout=0)
                for sid in dict.fromkeys(done):
                    wait.pending.discard(sid)
                    yield self.status(sid)
        finally:
            pubsub.close()

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
            if not entries and record is None:
                raise unknown(service_id)
            for raw_id, data in entries:
                yield {**decode_event(data), "event_id": raw_id.decode()}
            return
        for _, event in self.follow([record or service_id], timeout=timeout, replay=True):
            yield event

    def logs(
        self, service_id: str, *, tail: int | None = None, follow: bool = False,
        stream: str = "stdout",
    ) -> Iterator[str]:
        """Lines of the program's ``stdout`` (or ``stderr``), read from its work dir.

        ``tail`` keeps only the last lines; ``follow`` goes on yielding new lines until
        the service is final. Works where the work dir is visible (the core's machine or
        a shared file system); LogsUnavailable elsewhere.
        """
        record = self.status(service_id)
        path = output_path(record, stream)
        while path is None:  # not started yet: no work dir
            if not follow or record.final:
                return
            time.sleep(LOG_POLL)
            record = self.status(service_id)
            path = output_path(record, stream)
        out = OutputFile(path)
        yield from out.tail(tail)
        while follow:
            final = self.status(service_id).final
            yield from out.new_lines(final=final)
            if final:
                return
            time.sleep(LOG_POLL)

    def list(
        self, *, state: str | None = None, service: str | None = None, node: str | None = None,
        since: float | None = None, limit: int = 100,
    ) -> list[ServiceRecord]:
        """The newest services first, optionally only those in ``state``, of ``service``,
        on ``node``, or submitted at or after ``since`` (a ``time.time()`` value)."""
        out: list[ServiceRecord] = []
        start = 0
        while len(out) < limit:
            ids = self._call(self.redis.zrevrangebyscore, self.keys.services, "+inf",
                                  since if since is not None else "-inf", start=start, num=200)
            if not ids:
                break
            start += len(ids)
            pipe = self.redis.pipeline(transaction=False)
            for raw in ids:
                pipe.hgetall(self.keys.service(raw.decode()))
            for raw, data in zip(ids, self._call(pipe.execute)):
                if data:
                    record = ServiceRecord.from_hash(raw.decode(), data)
                    if matches(record, state, service, node):
                        out.append(record)
                        if len(out) >= limit:
                            break
        return out

    # -- steering -----------------------------------------------------------------------

    def cancel(self, service_id: str) -> str:
        """Cancel a service; returns what happened in plain words.

        A queued service (no core holds it) is ``cancelled`` at once and never starts.
        For one a core holds, the request is recorded in Redis and announced to the
        cores; it is durable: the core running it applies it within a heartbeat, and a
        core that takes it over later finds it. A finished service is left as it is
        (the answer says so); an unknown id raises UnknownService.
        """
        verdict, state = self._call(
            CANCEL.run, self.redis,
            [self.keys.service(service_id), self.keys.events(service_id), self.keys.cancels,
             self.keys.control],
            [service_id, time.time(), self.keys.notify, EVENTS_MAXLEN, ",".join(FINAL_VALUES),
             CONTROL_MAXLEN],
        )
        verdict, state = verdict.decode(), state.decode()
        if verdict == "unknown":
            raise UnknownService(f"no service with id {service_id!r}")
        if verdict == "final":
            return f"already {state}; nothing to cancel"
        if verdict == "cancelled":
            return "cancelled (it was queued and never started)"
        return f"cancel requested; it was {state} and will end cancelled"

    # -- logs ---------------------------------------------------------------------------

    def log_lines(self, service_id: str, tail: int = 100,
             streams: Iterable[str] | None = None) -> list[LogLine]:
        """The last ``tail`` lines of the service's output, oldest first (see also
        ``logs``, which reads the work dir's files).

        Read from Redis, so it works from any machine; soaf keeps the newest
        ``log_lines`` lines of each service there (the capped files in the work dir hold
        more). ``streams`` selects ``stdout``/``stderr``/``soaf`` (soaf's notes); default
        all. UnknownService if no such id was ever submitted.
        """
        self.status(service_id)
        return self._call(logstream.read_tail, self.redis, self.keys, service_id, tail,
                          streams)[0]

    def follow_logs(self, service_id: str, tail: int = 10, *,
                    streams: Iterable[str] | None = None,
                    timeout: float | None = None) -> Iterator[LogLine]:
        """The last ``tail`` lines, then each new line as it is written, until the service
        is final (every line written before the end is yielded). WaitTimeout after
        ``timeout`` seconds."""
        record = self.status(service_id)
        try:
            yield from logstream.follow(self.redis, self._blocking, self.keys, record, tail=tail,
                                        streams=streams, timeout=timeout, block_ms=_BLOCK_MS)
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise RedisUnavailable(f"cannot reach Redis at {redact(self.url or '')}: {e}") from e

    def plugins(self) -> dict[str, Any]:
        """Plugin version, services and last load error of every core, by node name."""
        data = self._call(self.redis.hgetall, self.keys.plugins)
        return {k.decode(): json.loads(v) for k, v in data.items()}

    def nodes(self) -> list[dict[str, Any]]:
        """The cores alive now (their heartbeat has not expired), with their load."""
        names = sorted(n.decode() for n in self._call(self.redis.smembers, self.keys.nodes))
        if not names:
            return []
        values = self._call(self.redis.mget, [self.keys.node(n) for n in names])
        return [json.loads(v) for v in values if v is not None]

    def reload(self, node: str | None = None) -> None:
        """Ask cores (all, or one ``node``) to reload their plugins now."""
        self._call(self.redis.xadd, self.keys.control, reload_fields(node),
                   maxlen=CONTROL_MAXLEN, approximate=True)
