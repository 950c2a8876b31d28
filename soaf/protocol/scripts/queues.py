"""The Lua of the queues: putting an entry in its service's queue, and a core's take.

Queues are streams, one per service and priority (``Keys.queue``), listed in the set
``Keys.queues`` (members ``<service>:<priority>``); ``Keys.ready`` lists those that may
hold entries no core has read yet. A core takes work with TAKE: one script that looks at
the next unread entry of each ready queue of the services it offers, and delivers
(XREADGROUP, inside the script) the best ``count`` of them to the core: highest priority
first, where every ``PRIORITY_AGING`` seconds an entry has waited count as one more
priority (so low priority is never starved), the oldest first among equals. A core
therefore never holds an entry it did not ask for, however many queues it reads.

With ``scan`` TAKE looks at every queue of the services offered (not only the ready
ones; it lists again as ready those with unread entries, e.g. pushed by a plain XADD) and
at the old submit stream, and returns per stream the id after which its next entry would
come, plus the last id of ``Keys.new_queues``: a core that has taken all there was blocks
on those streams (XREAD BLOCK) until one grows, at no cost to Redis meanwhile.
"""

from __future__ import annotations

from soaf.protocol.scripts.script import Script

# Lua: put ``fields`` into ``queue`` and mark it ready. A new queue is created with the
# consumer group (so a core that reads it later misses nothing), listed in ``index`` and
# announced on ``bell`` (idle cores wait on the queues they know, and on that). The entry
# goes first to a queue that exists (XADD NOMKSTREAM: no TYPE on the happy path); a key of
# another type is dropped and the queue created.
_ENQUEUE = """
local function soaf_set(key)
  local t = redis.call('TYPE', key)['ok']
  if t ~= 'none' and t ~= 'set' then redis.call('DEL', key) end
end
local function soaf_enqueue(queue, index, ready, bell, member, group, fields)
  pcall(redis.call, 'SADD', ready, member)  -- not a set: TAKE repairs it, scans find the queue
  local id = redis.pcall('XADD', queue, 'NOMKSTREAM', '*', unpack(fields))
  if type(id) == 'string' then return id end
  if id then  -- an error: a key of another type is dropped, any other error raised
    if string.sub(id.err, 1, 9) ~= 'WRONGTYPE' then
      return redis.call('XADD', queue, 'NOMKSTREAM', '*', unpack(fields))
    end
    redis.call('DEL', queue)
  end
  redis.call('XGROUP', 'CREATE', queue, group, '0', 'MKSTREAM')
  soaf_set(index)
  redis.call('SADD', index, member)
  if redis.call('TYPE', bell)['ok'] ~= 'stream' then redis.call('DEL', bell) end
  redis.call('XADD', bell, 'MAXLEN', '~', 1000, '*', 'queue', member)
  return redis.call('XADD', queue, '*', unpack(fields))
end
"""

# KEYS: target queue, queues index, source stream, the service's record, ready set, bell
# ARGV: group, member, source entry id, the source entry's reference (as a record's
# ``entry`` names it), then the entry's fields (name, value ...). Moves one entry: added to
# the target queue, acknowledged and deleted from the source, in one step (a put-back, or
# an entry of the old submit stream forwarded to its queue). A record that named the
# moved entry names the new one, so the core that takes it claims it (a new attempt).
# Returns the new entry's id.
REQUEUE_LUA = _ENQUEUE + """
local id = soaf_enqueue(KEYS[1], KEYS[2], KEYS[5], KEYS[6], ARGV[2], ARGV[1], {unpack(ARGV, 5)})
redis.call('XACK', KEYS[3], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[3], ARGV[3])
if redis.call('TYPE', KEYS[4])['ok'] == 'hash' then
  local ok, cur = pcall(cjson.decode, redis.call('HGET', KEYS[4], 'entry') or 'null')
  if ok and cur == ARGV[4] then redis.call('HSET', KEYS[4], 'entry', cjson.encode(KEYS[1] .. '/' .. id)) end
end
return id
"""

# KEYS: queues index, the old submit stream, ready set, bell (Keys.new_queues)
# ARGV: group, consumer, count, now (ms), aging (ms), queue prefix, scan ('1'/'0'),
# offered services ...
# Returns {taken, watch}: taken, a list of {stream, id, fields} delivered to the consumer
# (entries of the old submit stream first: the core forwards them to their queues);
# watch, with scan, a list of {stream, id} to block on (XREAD): each stream after its last
# entry delivered before this call (the caller moves it past what it took).
# Without scan the old submit stream is not looked at (a core blocks on it too, and scans
# when it grows), and when a single ready queue is offered its entries are read without a
# look first (nothing to compare): a busy take costs SMEMBERS and XREADGROUP.
TAKE_LUA = """
local group, consumer, want = ARGV[1], ARGV[2], tonumber(ARGV[3])
local now, aging, qp, scan = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6], ARGV[7] == '1'
local offered = {}
for i = 8, #ARGV do offered[ARGV[i]] = true end
local function ready(cmd, ...)  -- the ready set, dropped if someone made it another type
  local r = redis.pcall(cmd, KEYS[3], ...)
  if type(r) == 'table' and r.err then
    if string.sub(r.err, 1, 9) == 'WRONGTYPE' then redis.call('DEL', KEYS[3]) end
    return redis.call(cmd, KEYS[3], ...)
  end
  return r
end
local function last_delivered(key)  -- nil, and true when the key does not exist
  local groups = redis.pcall('XINFO', 'GROUPS', key)
  if groups.err then return nil, string.find(groups.err, 'no such key', 1, true) ~= nil end
  for _, g in ipairs(groups) do
    local name, last
    for j = 1, #g, 2 do
      if g[j] == 'name' then name = g[j + 1] elseif g[j] == 'last-delivered-id' then last = g[j + 1] end
    end
    if name == group then return last end
  end
  redis.call('XGROUP', 'CREATE', key, group, '0')
  return '0-0'
end
local function after(key, id)
  local r = redis.call('XRANGE', key, '(' .. id, '+', 'COUNT', 1)
  if r[1] then return r[1][1] end
  return nil
end
local function ms(id) return tonumber(string.match(id, '^(%d+)')) or 0 end
local taken, watch, cands = {}, {}, {}
local legacy, no_legacy = nil, false
if scan then legacy, no_legacy = last_delivered(KEYS[2]) end
if legacy then
  local r = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', want, 'STREAMS',
    KEYS[2], '>')
  if r and r[1] then
    for _, e in ipairs(r[1][2]) do table.insert(taken, {KEYS[2], e[1], e[2]}) end
  end
end
if legacy then
  table.insert(watch, {KEYS[2], legacy})
elseif no_legacy then
  table.insert(watch, {KEYS[2], '0-0'})
end
local ok, members = true, nil
if scan then ok, members = pcall(redis.call, 'SMEMBERS', KEYS[1]) else members = ready('SMEMBERS') end
if not ok then members = {} end
if not scan and want > 0 then  -- one ready queue offered: nothing to compare, read it at once
  local only
  for _, m in ipairs(members) do
    local svc = string.match(m, '^([^:]+):%-?%d+$')
    if svc and offered[svc] then
      if only then only = nil; break end
      only = m
    end
  end
  if only then
    local key = qp .. only
    local r = redis.pcall('XREADGROUP', 'GROUP', group, consumer, 'COUNT', want, 'STREAMS', key, '>')
    if type(r) == 'table' and r.err and string.sub(r.err, 1, 7) == 'NOGROUP'
        and not redis.pcall('XGROUP', 'CREATE', key, group, '0').err then
      r = redis.pcall('XREADGROUP', 'GROUP', group, consumer, 'COUNT', want, 'STREAMS', key, '>')
    end
    local got = (type(r) == 'table' and not r.err and r[1]) and r[1][2] or {}
    for _, e in ipairs(got) do table.insert(taken, {key, e[1], e[2]}) end
    if #got < want then ready('SREM', only) end
    return {taken, {}}
  end
end
for _, m in ipairs(members) do
  local svc, prio = string.match(m, '^([^:]+):(%-?%d+)$')
  if svc and offered[svc] then
    local key = qp .. m
    local last = last_delivered(key)
    local nxt = last and after(key, last)
    if last and scan then table.insert(watch, {key, last}) end
    if nxt then
      table.insert(cands, {key=key, m=m, prio=tonumber(prio), id=nxt})
      if scan then ready('SADD', m) end
    else
      ready('SREM', m)
    end
  end
end
while #taken < want and #cands > 0 do
  local best, bs, bms
  for i, c in ipairs(cands) do
    local t = ms(c.id)
    local s = c.prio + math.floor((now - t) / aging)
    if not best or s > bs or (s == bs and t < bms) then best, bs, bms = i, s, t end
  end
  local c = cands[best]
  local r = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', 1, 'STREAMS', c.key, '>')
  local e = r and r[1] and r[1][2][1]
  if e then
    table.insert(taken, {c.key, e[1], e[2]})
    c.id = after(c.key, e[1])
  else
    c.id = nil
  end
  if not c.id then
    ready('SREM', c.m)
    table.remove(cands, best)
  end
end
if not scan then return {taken, {}} end
local found, last = pcall(redis.call, 'XREVRANGE', KEYS[4], '+', '-', 'COUNT', 1)
local bell = found and last[1]
table.insert(watch, {KEYS[4], bell and bell[1] or '0-0'})
return {taken, watch}
"""

REQUEUE = Script(REQUEUE_LUA)
TAKE = Script(TAKE_LUA)
