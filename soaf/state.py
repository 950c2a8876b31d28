"""State records and events of services, and the Lua scripts that change them atomically.

A service's record is a Redis hash whose values are JSON texts (``"running"``, ``0.5``,
``null`` ...); custom fields set by a handler are stored as ``f:<name>``. Every change
also appends an event (the changed fields plus ``seq`` and ``ts``) to the service's
event stream and publishes a short note on the notify channel.

Each change carries the attempt number and a per-service sequence number. The record
script applies a change only if it is newer than what is stored, so replaying a batch
after a lost connection writes nothing twice, and a core that lost ownership of a
service (an older attempt) cannot overwrite the newer attempt's record.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import redis

from soaf.keys import Keys


class State(str, Enum):
    """The lifecycle of a service; ``succeeded`` ... ``rejected`` are final."""

    QUEUED = "queued"
    BUILDING = "building"
    PREPARING = "preparing"
    RUNNING = "running"
    RETRYING = "retrying"  # an attempt failed; the next one starts after a backoff
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"
    REJECTED = "rejected"
    LOST = "lost"

    def __str__(self) -> str:
        return self.value


FINAL_STATES = frozenset(
    {State.SUCCEEDED, State.FAILED, State.CANCELLED, State.TIMED_OUT, State.REJECTED}
)
FINAL_VALUES = frozenset(s.value for s in FINAL_STATES)
#: Events kept per service (approximate; older ones are trimmed).
EVENTS_MAXLEN = 1000

# KEYS: record, events, services zset, submit stream | ARGV: id, service, now, payload, notify
SUBMIT_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {0, redis.call('HGET', KEYS[1], 'state') or 'null'}
end
local entry = redis.call('XADD', KEYS[4], '*', 'payload', ARGV[4], 'id', ARGV[1])
local ev = cjson.encode({seq=1, attempt=0, ts=tonumber(ARGV[3]), state='queued'})
local evid = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*', 'data', ev)
redis.call('HSET', KEYS[1], 'service_id', cjson.encode(ARGV[1]), 'service', cjson.encode(ARGV[2]),
  'state', '"queued"', 'seq', '1', 'attempt', '0', 'queued_at', ARGV[3],
  'submitted_at', ARGV[3], 'entry', cjson.encode(entry), 'event_id', cjson.encode(evid))
redis.call('ZADD', KEYS[3], 'NX', ARGV[3], ARGV[1])
redis.call('PUBLISH', ARGV[5], cjson.encode({id=ARGV[1], seq=1, state='queued'}))
return {1, entry}
"""

# KEYS: record, events, services zset, cancels hash
# ARGV: id, service, now, node, entry, notify, maxlen, plugin_version, final states (csv)
# Returns {verdict, detail, attempt, seq, attempts json or ''};
# verdict: run | duplicate | final | cancelled
CLAIM_LUA = """
local state = redis.call('HGET', KEYS[1], 'state')
if state then state = cjson.decode(state) end
local entry = redis.call('HGET', KEYS[1], 'entry')
if entry then entry = cjson.decode(entry) end
local finals = {}
for s in string.gmatch(ARGV[9], '[^,]+') do finals[s] = true end
if state and finals[state] then return {'final', state, 0, 0, ''} end
if state and state ~= 'queued' and entry and entry ~= ARGV[5] then
  return {'duplicate', state, 0, 0, ''}
end
local attempt = tonumber(redis.call('HGET', KEYS[1], 'attempt') or '0') + 1
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0') + 1
local newstate = 'building'
if redis.call('HEXISTS', KEYS[4], ARGV[1]) == 1 then newstate = 'cancelled' end
local ev = {seq=seq, attempt=attempt, ts=tonumber(ARGV[3]), state=newstate, node=ARGV[4]}
if newstate == 'cancelled' then ev['error'] = 'cancelled before it started' end
local evid = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[7], '*', 'data', cjson.encode(ev))
redis.call('HSET', KEYS[1], 'service_id', cjson.encode(ARGV[1]), 'service', cjson.encode(ARGV[2]),
  'state', cjson.encode(newstate), 'seq', seq, 'attempt', attempt, 'node', cjson.encode(ARGV[4]),
  'entry', cjson.encode(ARGV[5]), newstate .. '_at', ARGV[3], 'event_id', cjson.encode(evid),
  'plugin_version', ARGV[8])
if newstate == 'cancelled' then
  redis.call('HSET', KEYS[1], 'error', '"cancelled before it started"')
  redis.call('HDEL', KEYS[4], ARGV[1])
end
if redis.call('HEXISTS', KEYS[1], 'submitted_at') == 0 then
  redis.call('HSET', KEYS[1], 'submitted_at', ARGV[3])
end
redis.call('ZADD', KEYS[3], 'NX', ARGV[3], ARGV[1])
redis.call('PUBLISH', ARGV[6], cjson.encode({id=ARGV[1], seq=seq, state=newstate}))
return {newstate == 'cancelled' and 'cancelled' or 'run', newstate, attempt, seq,
  redis.call('HGET', KEYS[1], 'attempts') or ''}
"""

# KEYS: record, events, cancels hash, control stream
# ARGV: id, now, notify, maxlen, final states (csv), control maxlen
# Returns {verdict, state}; verdict: unknown | final | cancelled (a queued service, now
# cancelled: no core holds it) | requested (recorded in the cancels hash and announced on
# the control stream; the core running it stops it, and a core that takes it later
# finds the request there).
CANCEL_LUA = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {'unknown', ''} end
state = cjson.decode(state)
for s in string.gmatch(ARGV[5], '[^,]+') do
  if s == state then return {'final', state} end
end
if state == 'queued' then
  local attempt = tonumber(redis.call('HGET', KEYS[1], 'attempt') or '0')
  local seq = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0') + 1
  local err = 'cancelled before it started'
  local ev = {seq=seq, attempt=attempt, ts=tonumber(ARGV[2]), state='cancelled', error=err}
  local evid = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'data', cjson.encode(ev))
  redis.call('HSET', KEYS[1], 'state', '"cancelled"', 'seq', seq, 'cancelled_at', ARGV[2],
    'finished_at', ARGV[2], 'error', cjson.encode(err), 'event_id', cjson.encode(evid))
  redis.call('HDEL', KEYS[3], ARGV[1])
  redis.call('PUBLISH', ARGV[3], cjson.encode({id=ARGV[1], seq=seq, state='cancelled'}))
  return {'cancelled', state}
end
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[6], '*', 'type', 'cancel', 'id', ARGV[1])
return {'requested', state}
"""

# KEYS: record, events, services zset
# ARGV: id, attempt, notify, maxlen, now, then per change: seq, event json, state ('' if
# none), n, then n field/value pairs. Changes are applied in order; each one only if it is
# newer than the record (attempt first, then seq). Returns the number applied, or -1 when
# the attempt is stale (a newer attempt took the service over: the caller must not
# acknowledge its entry).
RECORD_LUA = """
local cur_attempt = tonumber(redis.call('HGET', KEYS[1], 'attempt') or '0')
local cur_seq = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
local attempt = tonumber(ARGV[2])
if attempt < cur_attempt then return -1 end
local i = 6
local applied = 0
local evid = nil
while i <= #ARGV do
  local seq = tonumber(ARGV[i])
  local n = tonumber(ARGV[i + 3])
  if attempt > cur_attempt or seq > cur_seq then
    evid = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'data', ARGV[i + 1])
    if n > 0 then redis.call('HSET', KEYS[1], unpack(ARGV, i + 4, i + 3 + 2 * n)) end
    local note = {id=ARGV[1], seq=seq}
    if ARGV[i + 2] ~= '' then note['state'] = ARGV[i + 2] end
    redis.call('PUBLISH', ARGV[3], cjson.encode(note))
    cur_attempt = attempt
    cur_seq = seq
    applied = applied + 1
  end
  i = i + 4 + 2 * n
end
if applied > 0 then
  redis.call('HSET', KEYS[1], 'attempt', cur_attempt, 'seq', cur_seq,
    'event_id', cjson.encode(evid))
  redis.call('ZADD', KEYS[3], 'NX', ARGV[5], ARGV[1])
end
return applied
"""


class Script:
    """A Lua script called by its SHA1 (EVALSHA), so its text crosses the wire once."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()

    def call(self, target: Any, keys: list[str], args: list[Any]) -> Any:
        """Queue (on a pipeline) or run (on a client) the script."""
        return target.evalsha(self.sha, len(keys), *keys, *args)

    def run(self, client: redis.Redis, keys: list[str], args: list[Any]) -> Any:
        """Run on a client; load the script first if Redis does not know it."""
        try:
            return self.call(client, keys, args)
        except redis.exceptions.NoScriptError:
            return client.eval(self.text, len(keys), *keys, *args)

    def load(self, client: redis.Redis) -> None:
        client.script_load(self.text)


SUBMIT = Script(SUBMIT_LUA)
CLAIM = Script(CLAIM_LUA)
RECORD = Script(RECORD_LUA)
CANCEL = Script(CANCEL_LUA)
SCRIPTS = (SUBMIT, CLAIM, RECORD, CANCEL)


def is_noscript(result: Any) -> bool:
    return isinstance(result, redis.exceptions.NoScriptError)


FIELD_PREFIX = "f:"


@dataclass
class Change:
    """One change of a service's record, as queued for the state writer."""

    service_id: str
    attempt: int
    seq: int
    values: dict[str, Any]
    ts: float = field(default_factory=time.time)
    ack: str | None = None  # stream entry to acknowledge once this change is written
    #: Called from the writer thread once the change is in Redis, with True if it was
    #: applied (or had been, by an earlier try) and False if a newer attempt fenced it out.
    on_written: Callable[[bool], None] | None = field(default=None, repr=False)

    def flat(self) -> list[Any]:
        """This change's part of RECORD_LUA's ARGV (each value JSON-encoded once)."""
        pairs: list[str] = []
        parts = [f'"seq": {self.seq}, "attempt": {self.attempt}, "ts": {self.ts!r}']
        for key, value in self.values.items():
            encoded = json.dumps(value, default=str)
            pairs += [key, encoded]
            parts.append(f"{json.dumps(key)}: {encoded}")
        state = self.values.get("state") or ""
        return [self.seq, "{" + ", ".join(parts) + "}", state, len(pairs) // 2, *pairs]


def record_call(keys: Keys, changes: list[Change]) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV for RECORD_LUA writing ``changes`` (one service, one attempt, in order)."""
    first = changes[0]
    args: list[Any] = [first.service_id, first.attempt, keys.notify, EVENTS_MAXLEN, first.ts]
    for change in changes:
        args += change.flat()
    sid = first.service_id
    return [keys.service(sid), keys.events(sid), keys.services], args


@dataclass
class ServiceRecord:
    """A service's state record as read from Redis."""

    service_id: str
    state: str
    service: str | None = None
    attempt: int = 0
    seq: int = 0
    node: str | None = None
    exit_code: int | None = None
    progress: float | None = None
    error: str | None = None
    traceback: str | None = None
    message: str | None = None
    plugin_version: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def final(self) -> bool:
        return self.state in FINAL_VALUES

    @property
    def ok(self) -> bool:
        return self.state == State.SUCCEEDED.value

    @property
    def inputs(self) -> list[dict[str, Any]]:
        """What was staged into the work dir: name, source, size, files, mode."""
        return list(self.raw.get("inputs") or [])

    @property
    def outputs(self) -> list[dict[str, Any]]:
        """The collected outputs: name, size, sha256 and, when uploaded, url."""
        return list(self.raw.get("outputs") or [])

    def get(self, name: str, default: Any = None) -> Any:
        """Any stored field, e.g. ``record.get('running_at')``."""
        return self.raw.get(name, default)

    @classmethod
    def from_hash(cls, service_id: str, data: dict[bytes, bytes]) -> ServiceRecord:
        raw: dict[str, Any] = {}
        custom: dict[str, Any] = {}
        for k, v in data.items():
            key = k.decode()
            try:
                value = json.loads(v)
            except ValueError:
                value = v.decode(errors="replace")
            if key.startswith(FIELD_PREFIX):
                custom[key[len(FIELD_PREFIX):]] = value
            else:
                raw[key] = value
        return cls(
            service_id=service_id,
            state=raw.get("state") or "unknown",
            service=raw.get("service"),
            attempt=int(raw.get("attempt") or 0),
            seq=int(raw.get("seq") or 0),
            node=raw.get("node"),
            exit_code=raw.get("exit_code"),
            progress=raw.get("progress"),
            error=raw.get("error"),
            traceback=raw.get("traceback"),
            message=raw.get("message"),
            plugin_version=raw.get("plugin_version"),
            fields=custom,
            raw=raw,
        )

    def to_dict(self) -> dict[str, Any]:
        return {**self.raw, "service_id": self.service_id, "fields": self.fields}


def decode_event(data: dict[bytes, bytes]) -> dict[str, Any]:
    """The JSON body of one event stream entry."""
    try:
        return json.loads(data[b"data"])
    except (KeyError, ValueError):
        return {}
