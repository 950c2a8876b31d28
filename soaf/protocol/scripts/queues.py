"""The Lua of the queues: putting an entry in its service's queue, and a core's take.

Queues are streams, one per service and priority (``Keys.queue``), listed in the set
``Keys.queues`` (members ``<service>:<priority>``). A core takes work with TAKE: one
script that looks at the next undelivered entry of every queue of the services it offers,
and delivers (XREADGROUP, inside the script) the best ``count`` of them to the core:
highest priority first, where every ``PRIORITY_AGING`` seconds an entry has waited count as
one more priority (so low priority is never starved), the oldest first among equals. A
core therefore never holds an entry it did not ask for, however many queues it reads.
When there is nothing to take, TAKE returns, per queue, the id after which the next entry
would come: the core blocks on those streams (XREAD BLOCK) until one grows.
"""

from __future__ import annotations

from soaf.protocol.scripts.script import Script

# Lua: put ``fields`` into ``queue`` (created with the consumer group at its first entry,
# so a core that reads it later misses nothing) and list the queue in ``index``.
_ENQUEUE = """
local function soaf_enqueue(queue, index, member, group, fields)
  local t = redis.call('TYPE', queue)['ok']
  if t ~= 'stream' then
    if t ~= 'none' then redis.call('DEL', queue) end
    redis.call('XGROUP', 'CREATE', queue, group, '0', 'MKSTREAM')
  end
  if redis.call('TYPE', index)['ok'] ~= 'set' then redis.call('DEL', index) end
  redis.call('SADD', index, member)
  return redis.call('XADD', queue, '*', unpack(fields))
end
"""

# KEYS: target queue, queues index, source stream, the service's record
# ARGV: group, member, source entry id, the source entry's reference (as a record's
# ``entry`` names it), then the entry's fields (name, value ...). Moves one entry: added to
# the target queue, acknowledged and deleted from the source, in one step (a put-back, or
# an entry of the old submit stream forwarded to its queue). A record that named the
# moved entry names the new one, so the core that takes it claims it (a new attempt).
# Returns the new entry's id.
REQUEUE_LUA = _ENQUEUE + """
local id = soaf_enqueue(KEYS[1], KEYS[2], ARGV[2], ARGV[1], {unpack(ARGV, 5)})
redis.call('XACK', KEYS[3], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[3], ARGV[3])
if redis.call('TYPE', KEYS[4])['ok'] == 'hash' then
  local ok, cur = pcall(cjson.decode, redis.call('HGET', KEYS[4], 'entry') or 'null')
  if ok and cur == ARGV[4] then redis.call('HSET', KEYS[4], 'entry', cjson.encode(KEYS[1] .. '/' .. id)) end
end
return id
"""

# KEYS: queues index, the old submit stream
# ARGV: group, consumer, count, now (ms), aging (ms), queue prefix, offered services ...
# Returns {taken, watch}: taken, a list of {stream, id, fields} delivered to the consumer
# (entries of the old submit stream first: the core forwards them to their queues);
# watch, when nothing was taken, a list of {stream, id} to block on (XREAD) for more.
TAKE_LUA = """
local group, consumer, want = ARGV[1], ARGV[2], tonumber(ARGV[3])
local now, aging, qp = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
local offered = {}
for i = 7, #ARGV do offered[ARGV[i]] = true end
local function last_delivered(key)
  local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', key)
  if not ok then return nil end
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
local legacy = last_delivered(KEYS[2])
if legacy then
  local r = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', want, 'STREAMS',
    KEYS[2], '>')
  if r and r[1] then
    for _, e in ipairs(r[1][2]) do table.insert(taken, {KEYS[2], e[1], e[2]}) end
  end
  table.insert(watch, {KEYS[2], legacy})
end
local ok, members = pcall(redis.call, 'SMEMBERS', KEYS[1])
if not ok then members = {} end
for _, m in ipairs(members) do
  local svc, prio = string.match(m, '^([^:]+):(%-?%d+)$')
  if svc and offered[svc] then
    local key = qp .. m
    local last = last_delivered(key)
    if last then
      table.insert(watch, {key, last})
      local nxt = after(key, last)
      if nxt then table.insert(cands, {key=key, prio=tonumber(prio), id=nxt}) end
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
  if not c.id then table.remove(cands, best) end
end
if #taken > 0 then return {taken, {}} end
return {{}, watch}
"""

REQUEUE = Script(REQUEUE_LUA)
TAKE = Script(TAKE_LUA)
