"""The Lua scripts that change a service's record: submit, claim, record, cancel, reclaim, note.

Each change that must be atomic is one script; the comment above each one states its KEYS
and ARGV. Every script that reads a record is prefixed with ``_GUARD``
(soaf.protocol.scripts.guard): Redis is not trusted.
"""

from __future__ import annotations

from soaf.protocol.scripts.guard import _GUARD
from soaf.protocol.scripts.queues import _ENQUEUE
from soaf.protocol.scripts.script import Script

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

#: CLAIM's cancel argument of a core that did not read the cancels hash (never a signed value).
UNREAD_CANCEL = "?"

# KEYS: record, events, services zset, cancels hash
# ARGV: id, service, now, node, entry, notify, maxlen, plugin_version, final states (csv),
# the service's cancels-hash entry as read and verified by the core ('' for none), or
# UNREAD_CANCEL
# Returns {verdict (run|duplicate|final|cancelled|expired|check), detail, attempt, seq,
# attempts json|'', '1' when the core writes the ``building`` event}
# A claim to run writes who holds the service (state, attempt, node, entry) but leaves its
# ``building`` event (number ``seq``) to the core, which writes it with the run's next
# changes: one stream entry and one note for them all, as the writer holds changes that end
# nothing (soaf.core.writer). The record's ``seq`` stays at the last event written until
# then. A claim that ends the service (cancelled) writes its event and note itself.
# Lua cannot check an HMAC, so the core reads the cancels hash, checks the signature and
# passes what it verified: the service starts cancelled only if the hash still holds that
# very value. A cancel written after the read is applied by the heartbeat instead. A core
# that claims one entry saves that read (a round trip) with UNREAD_CANCEL: the script reads
# the entry itself, and if there is one writes nothing and returns {'check', the entry}
# for the core to verify and claim again with what it verified.
# The id is indexed (services zset) when its record has no ``submitted_at``: SUBMIT indexed
# the others, and the record script indexes again a record older than the record TTL.
# CLAIM only, ARGV 11: '1' for a payload older than the max age; with no record, a replay.
_FRESH = "if ARGV[11] == '1' and redis.call('EXISTS', KEYS[1]) == 0 then return {'expired'} end\n"
_READ = "local rec = soaf_read(KEYS[1])\n"
CLAIM_LUA = "local UNREAD_CANCEL = '" + UNREAD_CANCEL + "'\n" + """
local why = soaf_tampered(rec)
if why then
  soaf_fail_tampered(why, rec, ARGV[1], ARGV[3], ARGV[7], ARGV[6], 0)
  return {'final', 'failed', 0, 0, ''}
end
local state = rec.state and cjson.decode(rec.state)
local entry = rec.entry and cjson.decode(rec.entry)
local finals = {}
for s in string.gmatch(ARGV[9], '[^,]+') do finals[s] = true end
if state and finals[state] then return {'final', state, 0, 0, ''} end
if state and state ~= 'queued' and entry and entry ~= ARGV[5] then
  return {'duplicate', state, 0, 0, ''}
end
local attempt = tonumber(rec.attempt or '0') + 1
local seq = tonumber(rec.seq or '0') + 1
local newstate = 'building'
if ARGV[10] == UNREAD_CANCEL then
  local found = soaf_call('HGET', KEYS[4], ARGV[1])
  if found then return {'check', found, 0, 0, ''} end
elseif ARGV[10] ~= '' and soaf_call('HGET', KEYS[4], ARGV[1]) == ARGV[10] then
  newstate = 'cancelled'
end
local fields = {'service_id', cjson.encode(ARGV[1]), 'service', cjson.encode(ARGV[2]),
  'state', cjson.encode(newstate), 'attempt', attempt, 'node', cjson.encode(ARGV[4]),
  'entry', cjson.encode(ARGV[5]), newstate .. '_at', ARGV[3], 'plugin_version', ARGV[8]}
if newstate == 'cancelled' then
  local ev = {seq=seq, attempt=attempt, ts=tonumber(ARGV[3]), state=newstate, node=ARGV[4],
              error='cancelled before it started'}
  local evid = soaf_call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[7], '*', 'data', cjson.encode(ev))
  for _, v in ipairs({'seq', seq, 'event_id', cjson.encode(evid), 'error',
                      '"cancelled before it started"'}) do
    table.insert(fields, v)
  end
end
if not rec.submitted_at then
  table.insert(fields, 'submitted_at')
  table.insert(fields, ARGV[3])
end
redis.call('HSET', KEYS[1], unpack(fields))
if rec.waiting_for then redis.call('HDEL', KEYS[1], 'waiting_for') end
if newstate == 'cancelled' then soaf_call('HDEL', KEYS[4], ARGV[1]) end
if not rec.submitted_at then soaf_call('ZADD', KEYS[3], 'NX', ARGV[3], ARGV[1]) end
if newstate == 'cancelled' then
  redis.call('PUBLISH', ARGV[6], cjson.encode({id=ARGV[1], seq=seq, state=newstate}))
  return {'cancelled', newstate, attempt, seq, rec.attempts or '', '0'}
end
return {'run', newstate, attempt, seq, rec.attempts or '', '1'}
"""

# KEYS: record, events, cancels hash, control stream
# ARGV: id, now, notify, maxlen, final states (csv), control maxlen, signed cancel
# (soaf.protocol.signed: stored in the cancels hash and sent as the message's ``sig``)
# Returns {verdict, state}; verdict: unknown | final | cancelled (a queued service, now
# cancelled: no core holds it) | requested (recorded in the cancels hash and announced on
# the control stream; the core running it stops it, and a core that takes it later
# finds the request there).
CANCEL_LUA = """
local rec = soaf_read(KEYS[1])
local why = soaf_tampered(rec)
if why then
  if redis.call('EXISTS', KEYS[1]) == 0 then return {'unknown', ''} end
  soaf_fail_tampered(why, rec, ARGV[1], ARGV[2], ARGV[4], ARGV[3], 0)
  return {'final', 'failed'}
end
local state = rec.state
if not state then return {'unknown', ''} end
state = cjson.decode(state)
for s in string.gmatch(ARGV[5], '[^,]+') do
  if s == state then return {'final', state} end
end
if state == 'queued' then
  local attempt = tonumber(rec.attempt or '0')
  local seq = tonumber(rec.seq or '0') + 1
  local err = 'cancelled before it started'
  local ev = {seq=seq, attempt=attempt, ts=tonumber(ARGV[2]), state='cancelled', error=err}
  local evid = soaf_call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'data', cjson.encode(ev))
  redis.call('HSET', KEYS[1], 'state', '"cancelled"', 'seq', seq, 'cancelled_at', ARGV[2],
    'finished_at', ARGV[2], 'error', cjson.encode(err), 'event_id', cjson.encode(evid))
  soaf_call('HDEL', KEYS[3], ARGV[1])
  redis.call('PUBLISH', ARGV[3], cjson.encode({id=ARGV[1], seq=seq, state='cancelled'}))
  return {'cancelled', state}
end
soaf_call('HSET', KEYS[3], ARGV[1], ARGV[7])
redis.call('HSET', KEYS[1], 'cancel_requested_at', ARGV[2])
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[6], '*', 'type', 'cancel', 'id', ARGV[1],
  'sig', ARGV[7])
return {'requested', state}
"""

# The end of a service's entries (RECORD's KEYS and ARGV layout, see below): with the
# record script's ``result`` (not -1), each of the k entries is acknowledged and deleted
# from its stream, a cancel request is spent (when ``cancelled``: the record's
# ``cancel_requested_at``, which CANCEL sets with the request, says there is one), and the
# record, its events and the other aging keys get the record ttl, or the change's own ttl
# if shorter and the record call applied it (a refusal that met a record final already
# must not shorten its life).
_FINISH = """
local function soaf_finish(result, k, cancelled)
  if k == 0 then return end
  for j = 1, k do
    local stream = KEYS[#KEYS - k + j]
    redis.pcall('XACK', stream, ARGV[7], ARGV[10 + j])
    redis.pcall('XDEL', stream, ARGV[10 + j])
  end
  if cancelled then soaf_call('HDEL', KEYS[4], ARGV[1]) end
  local ttl = tonumber(ARGV[8])
  if result >= 0 and ARGV[9] ~= '' then
    local own = tonumber(ARGV[9])
    if ttl > 0 then ttl = math.min(ttl, own) else ttl = own end
  end
  if ttl > 0 then
    ttl = math.max(1, math.floor(ttl))
    redis.call('EXPIRE', KEYS[1], ttl)
    redis.call('EXPIRE', KEYS[2], ttl)
    for j = 5, #KEYS - k do redis.call('EXPIRE', KEYS[j], ttl) end
  end
end
"""

# KEYS: record, events, services zset; with entries to finish also the cancels hash, the
# other keys that age with the record (Keys.aging: log, payload), then each entry's stream.
# ARGV: id, attempt, notify, maxlen, now, index-again time ('' never), consumer group,
# record ttl, the final change's own ttl ('' none), k (entries to finish), k entry ids, then
# per change: seq, event json, state ('' if none), n, then n field/value pairs.
# Changes are applied in order; each one only if it is newer than the record (attempt
# first, then seq). The events of the applied changes go into one stream entry (its
# ``data`` one event, or a JSON array of them: soaf.protocol.state.decode_events); the
# record is written with one HSET and the call publishes one note: the last seq applied
# and the newest state among the changes. Returns the number applied, -1 when the attempt
# is stale (a newer attempt took the service over: its entries are not finished), or -3
# when the record is final already (nothing more may change it: an attempt has one final
# state; its entry is done). A tampered record is ended as failed (-3). Unless -1, the k
# entries are then finished (_FINISH) in the same call.
# The id is indexed again (ZADD NX) when its record has no ``submitted_at`` or one older
# than the index-again time (the heartbeat drops ids older than the record ttl).
RECORD_LUA = _FINISH + """
local function soaf_record(first)
  local attempt = tonumber(ARGV[2])
  local rec = soaf_read(KEYS[1])
  local why = soaf_tampered(rec)
  if why then
    soaf_fail_tampered(why, rec, ARGV[1], ARGV[5], ARGV[4], ARGV[3], attempt)
    return -3, rec
  end
  local cur_attempt = tonumber(rec.attempt or '0')
  local cur_seq = tonumber(rec.seq or '0')
  if attempt < cur_attempt then return -1, rec end
  local cur_state = rec.state and cjson.decode(rec.state)
  if cur_state and ({succeeded=1, failed=1, cancelled=1, timed_out=1, rejected=1})[cur_state] then
    local j = first
    while j <= #ARGV do
      if attempt > cur_attempt or tonumber(ARGV[j]) > cur_seq then return -3, rec end
      j = j + 4 + 2 * tonumber(ARGV[j + 3])
    end
    return 0, rec
  end
  local i = first
  local applied, state, fields, events = 0, nil, {}, {}
  while i <= #ARGV do
    local seq = tonumber(ARGV[i])
    local n = tonumber(ARGV[i + 3])
    if attempt > cur_attempt or seq > cur_seq then
      events[#events + 1] = ARGV[i + 1]
      for j = i + 4, i + 3 + 2 * n do fields[#fields + 1] = ARGV[j] end
      if #fields > 2000 then  -- unpack has a limit
        redis.call('HSET', KEYS[1], unpack(fields))
        fields = {}
      end
      if ARGV[i + 2] ~= '' then state = ARGV[i + 2] end
      cur_attempt = attempt
      cur_seq = seq
      applied = applied + 1
    end
    i = i + 4 + 2 * n
  end
  if applied > 0 then
    local data = events[1]
    if applied > 1 then data = '[' .. table.concat(events, ',') .. ']' end
    local evid = soaf_call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'data', data)
    for _, v in ipairs({'attempt', cur_attempt, 'seq', cur_seq, 'event_id', cjson.encode(evid)}) do
      fields[#fields + 1] = v
    end
    redis.call('HSET', KEYS[1], unpack(fields))
    local note = {id=ARGV[1], seq=cur_seq}
    if state then note['state'] = state end
    redis.call('PUBLISH', ARGV[3], cjson.encode(note))
    local since = tonumber(rec.submitted_at or '')
    if not since or (ARGV[6] ~= '' and since < tonumber(ARGV[6])) then
      soaf_call('ZADD', KEYS[3], 'NX', ARGV[5], ARGV[1])
    end
  end
  return applied, rec
end
local k = tonumber(ARGV[10])
local result, rec = soaf_record(11 + k)
if result ~= -1 then soaf_finish(result, k, rec.cancel_requested_at ~= false) end
return result
"""

# FINISH: _FINISH alone, for a durable writer that finishes entries only once replicas
# hold their final states. KEYS and ARGV as RECORD's, except that the k entry ids are
# followed by the record call's result instead of the changes.
FINISH_LUA = _FINISH + """
local k = tonumber(ARGV[10])
soaf_finish(tonumber(ARGV[11 + k]), k, true)
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
  local evid = soaf_call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[7], '*', 'data', cjson.encode(ev))
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
    local fevid = soaf_call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[7], '*', 'data',
      cjson.encode(fev))
    redis.call('HSET', KEYS[1], 'state', '"failed"', 'seq', fseq, 'failed_at', ARGV[3],
      'finished_at', ARGV[3], 'error', cjson.encode(err), 'failure', '"lost"',
      'event_id', cjson.encode(fevid))
    soaf_call('HDEL', KEYS[4], ARGV[1])
    redis.call('PUBLISH', ARGV[6], cjson.encode({id=ARGV[1], seq=fseq, state='failed'}))
    return {'failed', 'failed', pattempt, fseq, ''}
  end
end
"""
# The tamper check runs before the prologue reads the record (CLAIM_LUA repeats it, on
# what the prologue left).
_CLAIM_GUARD = """
local rec0 = soaf_read(KEYS[1])
local why0 = soaf_tampered(rec0)
if why0 then
  soaf_fail_tampered(why0, rec0, ARGV[1], ARGV[3], ARGV[7], ARGV[6], 0)
  return {'final', 'failed', 0, 0, ''}
end
"""
RECLAIM_LUA = _GUARD + _CLAIM_GUARD + _LOST_PROLOGUE + _READ + CLAIM_LUA

# NOTE: a note (JSON string) on a service still waiting to start (``waiting_for``), set
# only while its record is ``queued``. KEYS: record. ARGV: field, value. Returns 1 if set.
NOTE_LUA = """
local ok, state = pcall(redis.call, 'HGET', KEYS[1], 'state')
if not ok or state ~= '"queued"' then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(ARGV[2]))
return 1
"""


SUBMIT = Script(SUBMIT_LUA)
CLAIM = Script(_GUARD + _READ + _FRESH + CLAIM_LUA)
RECORD = Script(_GUARD + RECORD_LUA)
FINISH = Script(_GUARD + FINISH_LUA)
CANCEL = Script(_GUARD + CANCEL_LUA)
RECLAIM = Script(RECLAIM_LUA)
NOTE = Script(NOTE_LUA)
