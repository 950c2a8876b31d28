"""Client: submit templates and follow, wait for and cancel services, from anywhere.

Uses only the wire contract of docs/protocol.md (it never imports the core). Waiting
reads the service's event stream from the position stored in its record, so no event
between "read the record" and "follow the stream" can be missed.

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

from soaf import logstream
from soaf.codec import DEFAULT_MAX_PAYLOAD, check_loadable, dumps
from soaf.config import find_redis_url, find_secrets, state_dir_from_env
from soaf.connection import connect, redact
from soaf.errors import (
    ConfigError,
    DuplicateService,
    RedisUnavailable,
    UnknownService,
    ValidationError,
    WaitTimeout,
)
from soaf.keys import DEFAULT_PREFIX, Keys
from soaf.logstream import LogLine
from soaf.state import (
    CANCEL,
    EVENTS_MAXLEN,
    FINAL_VALUES,
    SUBMIT,
    ServiceRecord,
    decode_event,
)
from soaf.template import ServiceParamTemplate, validate_template

#: Longest single blocking read, in milliseconds; waits are made of such reads.
_BLOCK_MS = 2000
#: Waits on more ids than this follow the notify channel instead of event streams.
_STREAM_WAIT_MAX = 16
#: Seconds between re-reads of the records while following the notify channel.
_RECHECK_S = 2.0
#: Seconds a waiting call keeps retrying while Redis cannot be reached.
DEFAULT_RECONNECT_FOR = 30.0
#: Control messages kept (approximate).
CONTROL_MAXLEN = 10_000


class Client:
    """A connection to the Redis that soaf cores read from.

    ``url`` and ``secret`` default to what a core on this machine uses: SOAF_REDIS_URL
    and SOAF_SECRET, else the files of the embedded core's state dir (``.soaf/``).
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
        state = Path(state_dir) if state_dir is not None else state_dir_from_env()
        self.url = url or find_redis_url(state)
        if not self.url:
            raise ConfigError(
                "no Redis to talk to: set SOAF_REDIS_URL, pass url=, or start a core "
                f"with an embedded Redis here (looked for {state / 'redis.url'})"
            )
        self._secret = secret
        self._state_dir = state
        self.reconnect_for = reconnect_for
        env_max = os.environ.get("SOAF_MAX_PAYLOAD", "").strip()
        try:
            self.max_payload = max_payload or (int(env_max) if env_max else DEFAULT_MAX_PAYLOAD)
        except ValueError:
            raise ConfigError(f"SOAF_MAX_PAYLOAD must be an integer, got {env_max!r}")
        self.keys = Keys(prefix or os.environ.get("SOAF_PREFIX") or DEFAULT_PREFIX)
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
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise RedisUnavailable(f"cannot reach Redis at {redact(self.url or '')}: {e}") from e

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
        validate_template(template)
        secret = self._secret
        if secret is None:
            found = find_secrets(self._state_dir)
            secret = found[0] if found else None
        payload = dumps(template, secret)
        if len(payload) > self.max_payload:
            raise ValidationError("payload", f"the template pickles to {len(payload)} bytes, over "
                                             f"the limit of {self.max_payload} (SOAF_MAX_PAYLOAD)")
        check_loadable(payload)
        sid = template.service_id
        created, detail = self._call(
            SUBMIT.run, self.redis,
            [self.keys.service(sid), self.keys.events(sid), self.keys.services, self.keys.submit],
            [sid, template.service, time.time(), payload, self.keys.notify, EVENTS_MAXLEN],
        )
        if not created:
            raise DuplicateService(
                f"service id {sid!r} was already submitted (state {detail.decode().strip(chr(34))})"
            )
        return sid

    # -- reading ------------------------------------------------------------------------

    def status(self, service_id: str) -> ServiceRecord:
        """The current record; UnknownService if no such id was ever submitted."""
        data = self._call(self.redis.hgetall, self.keys.service(service_id))
        if not data:
            raise UnknownService(f"no service with id {service_id!r}")
        return ServiceRecord.from_hash(service_id, data)

    def _record_or_none(self, service_id: str, deadline: float | None = None
                        ) -> ServiceRecord | None:
        data = self._patient(deadline, self.redis.hgetall, self.keys.service(service_id))
        return ServiceRecord.from_hash(service_id, data) if data else None

    def wait(self, service_id: str, timeout: float | None = None) -> ServiceRecord:
        """Block until the service is final and return its record; WaitTimeout if not in time."""
        for record in self.as_completed([service_id], timeout=timeout):
            return record
        raise WaitTimeout(f"service {service_id} is not final")  # pragma: no cover

    def wait_all(self, ids: Iterable[str], timeout: float | None = None) -> list[ServiceRecord]:
        """Wait for all ``ids``; records in the order of ``ids``."""
        ids = list(ids)
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
        ids = list(dict.fromkeys(ids))
        if len(ids) > _STREAM_WAIT_MAX:
            yield from self._as_completed_notify(ids, timeout)
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        positions: dict[str, str] = {}
        for sid in ids:
            record = self._record_or_none(sid, deadline)
            if record is not None and record.final:
                yield record
                continue
            positions[sid] = (record.raw.get("event_id") if record else None) or "0-0"
        while positions:
            block = self._block_ms(deadline, positions, timeout)
            streams = {self.keys.events(sid): pos for sid, pos in positions.items()}
            resp = self._patient(deadline, self._blocking.xread, streams, block=block)
            finished: set[str] = set()
            for stream, entries in resp or []:
                sid = stream.decode().rsplit("{", 1)[1].rstrip("}")
                for raw_id, data in entries:
                    positions[sid] = raw_id.decode()
                    if decode_event(data).get("state") in FINAL_VALUES:
                        finished.add(sid)
            for sid in finished:
                positions.pop(sid, None)
                record = self._record_or_none(sid, deadline)
                if record is None:
                    raise UnknownService(f"no service with id {sid!r}")
                yield record

    @staticmethod
    def _block_ms(deadline: float | None, pending: Iterable[str], timeout: float | None) -> int:
        block = _BLOCK_MS
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                pending = list(pending)
                raise WaitTimeout(
                    f"{len(pending)} service(s) not final after {timeout} s: "
                    + ", ".join(pending[:5])
                )
            block = max(1, min(block, int(left * 1000)))
        return block

    def _final_states(self, ids: Iterable[str], deadline: float | None) -> dict[str, str]:
        ids = list(ids)
        pipe = self.redis.pipeline(transaction=False)
        for sid in ids:
            pipe.hget(self.keys.service(sid), "state")
        states = self._patient(deadline, pipe.execute)
        return {
            sid: json.loads(raw) for sid, raw in zip(ids, states)
            if raw is not None and json.loads(raw) in FINAL_VALUES
        }

    def _as_completed_notify(
        self, ids: list[str], timeout: float | None
    ) -> Iterator[ServiceRecord]:
        deadline = None if timeout is None else time.monotonic() + timeout
        pending = set(ids)
        pubsub = self._blocking.pubsub(ignore_subscribe_messages=True)
        try:
            self._patient(deadline, pubsub.subscribe, self.keys.notify)
            next_check = 0.0
            while pending:
                now = time.monotonic()
                done: set[str] = set()
                if now >= next_check:  # subscribed first, so nothing slips between
                    done = set(self._final_states(pending, deadline))
                    next_check = now + _RECHECK_S
                else:
                    block = self._block_ms(deadline, pending, timeout) / 1000
                    # After an outage redis-py subscribes again; what was published
                    # meanwhile is caught by the next re-check of the records.
                    message = self._patient(deadline, pubsub.get_message,
                                            timeout=min(block, _RECHECK_S))
                    while message is not None:
                        try:
                            note = json.loads(message["data"])
                        except (ValueError, TypeError):
                            note = {}
                        if note.get("id") in pending and note.get("state") in FINAL_VALUES:
                            done.add(note["id"])
                        message = self._call(pubsub.get_message, timeout=0)
                self._block_ms(deadline, pending - done, timeout) if not done else None
                for sid in done:
                    pending.discard(sid)
                    record = self._record_or_none(sid, deadline)
                    if record is None:
                        raise UnknownService(f"no service with id {sid!r}")
                    yield record
        finally:
            pubsub.close()

    def events(
        self, service_id: str, *, follow: bool = True, timeout: float | None = None
    ) -> Iterator[dict[str, Any]]:
        """Every event of the service from the first, then live ones until it is final.

        Replay and live reading are one stream read, so there is neither a gap nor a
        duplicate between them. Stops after the final event (or at once when
        ``follow`` is False and the past is replayed); WaitTimeout after ``timeout``.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        position = "0-0"
        key = self.keys.events(service_id)
        while True:
            entries = self._patient(deadline, self.redis.xrange, key,
                                    min=f"({position}" if position != "0-0" else "-", count=500)
            for raw_id, data in entries:
                position = raw_id.decode()
                event = decode_event(data)
                event["event_id"] = position
                yield event
                if event.get("state") in FINAL_VALUES:
                    return
            if entries:
                continue
            if not follow:
                return
            block = _BLOCK_MS
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WaitTimeout(f"no final event for {service_id} after {timeout} s")
                block = max(1, min(block, int(left * 1000)))
            self._patient(deadline, self._blocking.xread, {key: position}, block=block, count=1)

    def list(
        self, *, state: str | None = None, service: str | None = None, limit: int = 100
    ) -> list[ServiceRecord]:
        """The newest services first, optionally only those in ``state`` / of ``service``."""
        out: list[ServiceRecord] = []
        start = 0
        while len(out) < limit:
            ids = self._call(self.redis.zrevrange, self.keys.services, start, start + 199)
            if not ids:
                break
            start += len(ids)
            pipe = self.redis.pipeline(transaction=False)
            for raw in ids:
                pipe.hgetall(self.keys.service(raw.decode()))
            for raw, data in zip(ids, self._call(pipe.execute)):
                if not data:
                    continue
                record = ServiceRecord.from_hash(raw.decode(), data)
                if (state is None or record.state == state) and (
                    service is None or record.service == service
                ):
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

    def logs(self, service_id: str, tail: int = 100,
             streams: Iterable[str] | None = None) -> list[LogLine]:
        """The last ``tail`` lines of the service's output, oldest first.

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
        """Plugin version and last load error of every core, by node name."""
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
        fields = {"type": "reload", **({"node": node} if node else {})}
        self._call(self.redis.xadd, self.keys.control, fields, maxlen=CONTROL_MAXLEN,
                   approximate=True)
