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

import json
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from soaf.keys import Keys


class State(str, Enum):
    """The lifecycle of a service; the last four (and ``rejected``) are final."""

    QUEUED = "queued"
    BUILDING = "building"
    PREPARING = "preparing"
    RUNNING = "running"
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
# Returns {verdict, detail, attempt, seq}; verdict: run | duplicate | final | cancelled
CLAIM_LUA = """
local state = redis.call('HGET', KEYS[1], 'state')
if state then state = cjson.decode(state) end
local entry = redis.call('HGET', KEYS[1], 'entry')
if entry then entry = cjson.decode(entry) end
local finals = {}
for s in string.gmatch(ARGV[9], '[^,]+') do finals[s] = true end
if state and finals[state] then return {'final', state, 0, 0} end
if state and state ~= 'queued' and entry and entry ~= ARGV[5] then
  return {'duplicate', state, 0, 0}
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
return {newstate == 'cancelled' and 'cancelled' or 'run', newstate, attempt, seq}
"""

# KEYS: record, events | ARGV: id, attempt, seq, notify, maxlen, event json, k1, v1, k2, v2 ...
RECORD_LUA = """
local cur_attempt = tonumber(redis.call('HGET', KEYS[1], 'attempt') or '0')
local cur_seq = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
local attempt = tonumber(ARGV[2])
local seq = tonumber(ARGV[3])
if attempt < cur_attempt or (attempt == cur_attempt and seq <= cur_seq) then return 0 end
local evid = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'data', ARGV[6])
redis.call('HSET', KEYS[1], 'attempt', attempt, 'seq', seq, 'event_id', cjson.encode(evid))
for i = 7, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
local state = nil
for i = 7, #ARGV, 2 do if ARGV[i] == 'state' then state = cjson.decode(ARGV[i + 1]) end end
redis.call('PUBLISH', ARGV[4], cjson.encode({id=ARGV[1], seq=seq, state=state}))
return 1
"""

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

    def record_args(self, keys: Keys) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV for RECORD_LUA."""
        event = {"seq": self.seq, "attempt": self.attempt, "ts": self.ts, **self.values}
        flat: list[Any] = []
        for key, value in self.values.items():
            flat += [key, json.dumps(value, default=str)]
        args = [
            self.service_id,
            self.attempt,
            self.seq,
            keys.notify,
            EVENTS_MAXLEN,
            json.dumps(event, default=str),
            *flat,
        ]
        return [keys.service(self.service_id), keys.events(self.service_id)], args


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
