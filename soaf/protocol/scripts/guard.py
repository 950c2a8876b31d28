"""The Lua every script that reads a service's record starts with: Redis is not trusted.

Someone who can write to Redis without the secret may edit a record or give a key another
type; that must cost the one service concerned and never make a script raise (a core would
take the error for its own).
"""

from __future__ import annotations

# Prepended to every script that reads a service's record (KEYS[1]; KEYS[2] its events).
# Redis is not trusted: a record edited by someone without the secret must never make a
# script raise (a core would take the error for its own). A key of the wrong type (the
# record, its events, the services index, the cancels hash) is dropped where a script
# first touches it: ``soaf_call`` runs the command and only when Redis answers WRONGTYPE
# deletes the key and runs it again, so the happy path costs no TYPE. ``soaf_read`` reads
# the record's fields the scripts decide on with one HMGET; a record whose numbers are not
# numbers or whose texts are not texts is "tampered" (soaf_tampered returns why), and
# soaf_fail_tampered ends it as failed, so a tampered record costs that one service and
# nothing else.
_GUARD = """
local function soaf_call(cmd, key, ...)
  local r = redis.pcall(cmd, key, ...)
  if type(r) == 'table' and r.err then
    if string.sub(r.err, 1, 9) == 'WRONGTYPE' then redis.call('DEL', key) end
    return redis.call(cmd, key, ...)
  end
  return r
end
local soaf_fields = {'attempt', 'seq', 'lost_count', 'state', 'entry', 'service_id',
                     'attempts', 'submitted_at', 'waiting_for', 'cancel_requested_at'}
local function soaf_read(key)
  local values = soaf_call('HMGET', key, unpack(soaf_fields))
  local rec = {}
  for i, name in ipairs(soaf_fields) do rec[name] = values[i] end
  return rec
end
local function soaf_tampered(rec)
  for _, name in ipairs({'attempt', 'seq', 'lost_count'}) do
    local v = rec[name]
    if v and not (string.match(v, '^%d+$') and #v <= 15) then
      return name .. ' is not a number'
    end
  end
  for _, name in ipairs({'state', 'entry', 'service_id'}) do
    local v = rec[name]
    if v then
      local ok, d = pcall(cjson.decode, v)
      if not ok or type(d) ~= 'string' then return name .. ' is not a string' end
    end
  end
  return nil
end
local function soaf_fail_tampered(why, rec, id, now, maxlen, notify, attempt)
  local seq = tonumber(rec.seq or '') or 0
  if not (seq >= 0 and seq < 1e15) then seq = 0 end
  seq = math.floor(seq) + 1
  local err = 'record tampered: ' .. why
  local ev = {seq=seq, attempt=attempt, ts=tonumber(now), state='failed', error=err,
              failure='tampered'}
  local evid = soaf_call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*', 'data', cjson.encode(ev))
  redis.call('HDEL', KEYS[1], 'lost_count', 'entry')
  redis.call('HSET', KEYS[1], 'service_id', cjson.encode(id), 'state', '"failed"',
    'attempt', attempt, 'seq', seq, 'error', cjson.encode(err), 'failure', '"tampered"',
    'failed_at', now, 'finished_at', now, 'event_id', cjson.encode(evid))
  redis.call('PUBLISH', notify, cjson.encode({id=id, seq=seq, state='failed'}))
end
"""
