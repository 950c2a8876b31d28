"""The Lua scripts that change a service's record: submit, claim, record, cancel, reclaim, note.

Each change that must be atomic is one script; the comment above each one states its KEYS
and ARGV. Every script that reads a record first runs ``_GUARD``: Redis is not trusted.
"""

from __future__ import annotations

from soaf.protocol.scripts.queues import _ENQUEUE
from soaf.protocol.scripts.script import Script

# Prepended to every script that reads a service's record (KEYS[1]; KEYS[2] its events).
# Redis is not trusted: a record edited by someone without the secret must never make a
# script raise (a core would take the error for its own). Keys of the wrong type are
# dropped (the record, its events, the services index, the cancels hash); a record whose
# numbers are not numbers or whose texts are not texts is "tampered" (soaf_tampered
# returns why), and soaf_fail_tampered ends it as failed, so a tampered record costs that
# one service and nothing else.
_GUARD = """
local function soaf_drop_wrong_type(key, want)
  if not key then return end
  local t = redis.call('TYPE', key)['ok']
  if t ~= 'none' and t ~= want then redis.call('DEL', key) end
end
local function soaf_tampered(key)
  for _, name in ipairs({'attempt', 'seq', 'lost_count'}) do
    local v = redis.call('HGET', key, name)
    if v and not (string.match(v, '^%d+$') and #v <= 15) then
      return name .. ' is not a number'
    end
  end
  for _, name in ipairs({'state', 'entry', 'service_id'}) do
    local v = redis.call('HGET', key, name)
    if v then
      local ok, d = pcall(cjson.decode, v)
      if not ok or type(d) ~= 'string' then return name .. ' is not a string' end
    end
  end
  return nil
end
local function soaf_fail_tampered(why, id, now, maxlen, notify, attempt)
  local seq = tonumber(redis.call('HGET', KEYS[1], 'seq') or '') or 0
  if not (seq >= 0 and seq < 1e15) then seq = 0 end
  seq = math.floor(seq) + 1
  local err = 'record tampered: ' .. why
  local ev = {seq=seq, attempt=attempt, ts=tonumber(now), state='failed', error=err,
              failure='tampered'}
  local evid = redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*', 'data', cjson.encode(ev))
  redis.call('HDEL', KEYS[1], 'lost_count', 'entry')
  redis.call('HSET', KEYS[1], 'service_id', cjson.encode(id), 'state', '"failed"',
    'attempt', attempt, 'seq', seq, 'error', cjson.encode(err), 'failure', '"tampered"',
    'failed_at', now, 'finished_at', now, 'event_id', cjson.encode(evid))
  redis.call('PUBLISH', notify, cjson.encode({id=id, seq=seq, state='failed'}))
end
soaf_drop_wrong_type(KEYS[1], 'hash')
soaf_drop_wrong_type(KEYS[2], 'stream')
"""

# KEYS: record, events, services zset, queue, queues index, offered zset, ready set, bell,
# payload (optional: the payload is also kept beside the record, aging with it, for resubmits)
# ARGV: id, service, now, payload, notify, events maxlen, priority, queue member,
# require a core ('1'/'0'), consumer group
# Returns {1, entry reference}; {0, state} for an id that has a record; {2, ''} when no
# live core offers the service and a core was required (nothing is written then). A
# service no live core offers is queued all the same, its record saying why it waits.
SUBMIT_LUA = _ENQUEUE + """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {0, redis.call('HGET', KEYS[1], 'state') or 'null'}
end
local found, expiry = pcall(redis.call, 'ZSCORE', KEYS[6], ARGV[2])
local offered = found and expiry and tonumber(expiry) > tonumber(ARGV[3])
if not offered and ARGV[9] == '1' then return {2, ''} end
local id = soaf_enqueue(KEYS[4], KEYS[5], KEYS[7], KEYS[8], ARGV[8], ARGV[10],
  {'payload', ARGV[4], 'id', ARGV[1], 'service', ARGV[2], 'priority', ARGV[7]})
local entry = KEYS[4] .. '/' .. id
if KEYS[9] then redis.call('SET', KEYS[9], ARGV[4]) end
local ev = {seq=1, attempt=0, ts=tonumber(ARGV[3]), state='queued'}
if not offered then ev['waiting_for'] = 'no live core offers ' .. "'" .. ARGV[2] .. "'" end
local evid = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*', 'data', cjson.encode(ev))
redis.call('HSET', KEYS[1], 'service_id', cjson.encode(ARGV[1]), 'service', cjson.encode(ARGV[2]),
  'state', '"queued"', 'seq', '1', 'attempt', '0', 'queued_at', ARGV[3],
  'submitted_at', ARGV[3], 'entry', cjson.encode(entry), 'event_id', cjson.encode(evid),
  'priority', ARGV[7])
if not offered then redis.call('HSET', KEYS[1], 'waiting_for', cjson.encode(ev['waiting_for'])) end
redis.call('ZADD', KEYS[3], 'NX', ARGV[3], ARGV[1])
redis.call('PUBLISH', ARGV[5], cjson.encode({id=ARGV[1], seq=1, state='queued'}))
return {1, entry}
"""

# KEYS: record, events, services zset, cancels hash
# ARGV: id, service, now, node, entry, notify, maxlen, plugin_version, final states (csv),
# the service's cancels-hash entry as read and verified by the core ('' for none)
# Returns {verdict (run|duplicate|final|cancelled|expired), detail, attempt, seq, attempts json|''}
# Lua cannot check an HMAC, so the core reads the cancels hash, checks the signature and
# passes what it verified: the service starts cancelled only if the hash still holds that
# very value. A cancel written after the read is applied by the heartbeat instead.
# CLAIM only, ARGV 11: '1' for a payload older than the max age; with no record, a replay.
_FRESH = "if ARGV[11] == '1' and redis.call('EXISTS', KEYS[1]) == 0 then return {'expired'} end\n"
CLAIM_LUA = """
soaf_drop_wrong_type(KEYS[3], 'zset')
soaf_drop_wrong_type(KEYS[4], 'hash')
local why = soaf_tampered(KEYS[1])
if why then
  soaf_fail_tampered(why, ARGV[1], ARGV[3], ARGV[7], ARGV[6], 0)
  return {'final', 'failed', 0, 0, ''}
end
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
if ARGV[10] ~= '' and redis.call('HGET', KEYS[4], ARGV[1]) == ARGV[10] then
  newstate = 'cancelled'
end
local ev = {seq=seq, attempt=attempt, ts=tonumber(ARGV[3]), state=newstate, node=ARGV[4]}
if newstate == 'cancelled' then ev['error'] = 'cancelled before it started' end
local evid = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[7], '*', 'data', cjson.encode(ev))
redis.call('HSET', KEYS[1], 'service_id', cjson.encode(ARGV[1]), 'service', cjson.encode(ARGV[2]),
  'state', cjson.encode(newstate), 'seq', seq, 'attempt', attempt, 'node', cjson.encode(ARGV[4]),
  'entry', cjson.encode(ARGV[5]), newstate .. '_at', ARGV[3], 'event_id', cjson.encode(evid),
  'plugin_version', ARGV[8])
redis.call('HDEL', KEYS[1], 'waiting_for')
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
# ARGV: id, now, notify, maxlen, final states (csv), control maxlen, signed cancel
# (soaf.protocol.signed: stored in the cancels hash and sent as the message's ``sig``)
# Returns {verdict, state}; verdict: unknown | final | cancelled (a queued service, now
# cancelled: no core holds it) | requested (recorded in the cancels hash and announced on
# the control stream; the core running it stops it, and a core that takes it later
# finds the request there).
CANCEL_LUA = """
soaf_drop_wrong_type(KEYS[3], 'hash')
local why = soaf_tampered(KEYS[1])
if why then
  if redis.call('EXISTS', KEYS[1]) == 0 then return {'unknown', ''} end
  soaf_fail_tampered(why, ARGV[1], ARGV[2], ARGV[4], ARGV[3], 0)
  return {'final', 'failed'}
end
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
redis.call('HSET', KEYS[3], ARGV[1], ARGV[7])
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[6], '*', 'type', 'cancel', 'id', ARGV[1],
  'sig', ARGV[7])
return {'requested', state}
"""

# KEYS: record, events, services zset
# ARGV: id, attempt, notify, maxlen, now, then per change: seq, event json, state ('' if
# none), n, then n field/value pairs. Changes are applied in order; each one only if it is
# newer than the record (attempt first, then seq). Returns the number applied, -1 when
# the attempt is stale (a newer attempt took the service over: the caller must not
# acknowledge its entry), or -3 when the record is final already (nothing more may change
# it: an attempt has one final state; its entry is done). A tampered record is ended as
# failed (-3).
RECORD_LUA = """
soaf_drop_wrong_type(KEYS[3], 'zset')
local attempt = tonumber(ARGV[2])
local why = soaf_tampered(KEYS[1])
if why then
  soaf_fail_tampered(why, ARGV[1], ARGV[5], ARGV[4], ARGV[3], attempt)
  return -3
end
local cur_attempt = tonumber(redis.call('HGET', KEYS[1], 'attempt') or '0')
local cur_seq = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
if attempt < cur_attempt then return -1 end
local cur_state = redis.call('HGET', KEYS[1], 'state')
if cur_state then
  cur_state = cjson.decode(cur_state)
  if ({succeeded=1, failed=1, cancelled=1, timed_out=1, rejected=1})[cur_state] then
    local j = 6
    while j <= #ARGV do
      if attempt > cur_attempt or tonumber(ARGV[j]) > cur_seq then return -3 end
      j = j + 4 + 2 * tonumber(ARGV[j + 3])
    end
    return 0
  end
end
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

# Prepended to CLAIM_LUA. Extra ARGV: 11 lost attempts allowed, 12 reason, 13 node that
# lost it. When the entry's service is mid-run (not queued, not final) under this very
# entry, its attempt was lost: record that, move the lost attempt into the ``attempts``
# list, and end the service as failed once more attempts were lost than allowed. Lost
# attempts never count as failures (retries stay for the program's own failures).
_LOST_PROLOGUE = """
local function jget(name)
  local raw = redis.call('HGET', KEYS[1], name)
  if not raw then return nil end
  local ok, v = pcall(cjson.decode, raw)
  if ok and v ~= cjson.null then return v end
  return nil
end
local pstate = jget('state')
local pentry = jget('entry')
local pfinals = {}
for s in string.gmatch(ARGV[9], '[^,]+') do pfinals[s] = true end
if type(pstate) == 'string' and not pfinals[pstate] and pstate ~= 'queued'
    and pentry == ARGV[5] then
  local now = tonumber(ARGV[3])
  local pattempt = tonumber(redis.call('HGET', KEYS[1], 'attempt') or '0') or 0
  local pseq = (tonumber(redis.call('HGET', KEYS[1], 'seq') or '0') or 0) + 1
  local lost = (tonumber(redis.call('HGET', KEYS[1], 'lost_count') or '0') or 0) + 1
  local attempts = jget('attempts')
  if type(attempts) ~= 'table' then attempts = {} end
  local gone = {attempt=pattempt, state='lost', error=ARGV[12], node=ARGV[13],
                lost_in=pstate, ended_at=now}
  for _, name in ipairs({'work_dir', 'pid', 'exit_code', 'signal', 'running_at'}) do
    local v = jget(name)
    if v ~= nil then gone[name] = v end
  end
  table.insert(attempts, gone)
  local ev = {seq=pseq, attempt=pattempt, ts=now, state='lost', node=ARGV[13],
              error=ARGV[12], lost_in=pstate, lost_count=lost}
  local evid = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[7], '*', 'data', cjson.encode(ev))
  redis.call('HSET', KEYS[1], 'state', '"lost"', 'seq', pseq, 'lost_at', ARGV[3],
    'lost_reason', cjson.encode(ARGV[12]), 'event_id', cjson.encode(evid),
    'attempts', cjson.encode(attempts), 'lost_count', lost)
  redis.call('PUBLISH', ARGV[6], cjson.encode({id=ARGV[1], seq=pseq, state='lost'}))
  if lost > (tonumber(ARGV[11]) or 0) then
    local fseq = pseq + 1
    local err = 'lost ' .. lost .. ' times: the cores running it kept dying or stopping ' ..
      'without draining (last: ' .. ARGV[12] .. '; max_lost ' .. ARGV[11] ..
      '); see the logs of core ' .. ARGV[13] .. ' around that time'
    local fev = {seq=fseq, attempt=pattempt, ts=now, state='failed',
                 node=ARGV[13], error=err, failure='lost'}
    local fevid = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[7], '*', 'data',
      cjson.encode(fev))
    redis.call('HSET', KEYS[1], 'state', '"failed"', 'seq', fseq, 'failed_at', ARGV[3],
      'finished_at', ARGV[3], 'error', cjson.encode(err), 'failure', '"lost"',
      'event_id', cjson.encode(fevid))
    redis.call('HDEL', KEYS[4], ARGV[1])
    redis.call('PUBLISH', ARGV[6], cjson.encode({id=ARGV[1], seq=fseq, state='failed'}))
    return {'failed', 'failed', pattempt, fseq, ''}
  end
end
"""
# The tamper check runs before the prologue reads the record (CLAIM_LUA repeats it).
_CLAIM_GUARD = """
soaf_drop_wrong_type(KEYS[4], 'hash')
local why0 = soaf_tampered(KEYS[1])
if why0 then
  soaf_fail_tampered(why0, ARGV[1], ARGV[3], ARGV[7], ARGV[6], 0)
  return {'final', 'failed', 0, 0, ''}
end
"""
RECLAIM_LUA = _GUARD + _CLAIM_GUARD + _LOST_PROLOGUE + CLAIM_LUA

# NOTE: a note (JSON string) on a service still waiting to start (``waiting_for``), set
# only while its record is ``queued``. KEYS: record. ARGV: field, value. Returns 1 if set.
NOTE_LUA = """
local ok, state = pcall(redis.call, 'HGET', KEYS[1], 'state')
if not ok or state ~= '"queued"' then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(ARGV[2]))
return 1
"""


SUBMIT = Script(SUBMIT_LUA)
CLAIM = Script(_GUARD + _FRESH + CLAIM_LUA)
RECORD = Script(_GUARD + RECORD_LUA)
CANCEL = Script(_GUARD + CANCEL_LUA)
RECLAIM = Script(RECLAIM_LUA)
NOTE = Script(NOTE_LUA)
