"""The Lua scripts about cores: the heartbeat's compare-and-set, takeover of a dead node's
entries, and the per-node plugin version counter."""

from __future__ import annotations

# Lua: true when ``key`` is this core's heartbeat (it holds ``token``) on the server that
# runs the script. A core judges others dead only where it sees its own heartbeat: a server
# that lacks it is not the one its beats reach (a failover that left two masters for a while,
# each connection following whichever Sentinel named when it connected) or lost data (a
# replica promoted before it had the last writes), and there every live core can look dead.
_OWN = """
local function soaf_own(key, token)
  local ok, cur = pcall(redis.call, 'GET', key)
  if not ok or not cur then return false end
  local fine, v = pcall(cjson.decode, cur)
  return fine and type(v) == 'table' and v['token'] == token
end
"""

# KEYS: the taker's own heartbeat, then the heartbeats of the nodes asked about
# ARGV: the taker's token
# Returns -1 when the taker's own heartbeat is not on this server (nothing can be judged
# here), else 1 or 0 per node asked about: its heartbeat is missing.
MISSING_LUA = _OWN + """
if not soaf_own(KEYS[1], ARGV[1]) then return -1 end
local missing = {}
for i = 2, #KEYS do missing[i - 1] = 1 - redis.call('EXISTS', KEYS[i]) end
return missing
"""

# KEYS: heartbeat of the dead node, submit stream, the taker's own heartbeat
# ARGV: group, dead consumer, taker, count, the taker's token
# The heartbeat checks and the claim are one atomic step: two takers never both get an entry,
# a node whose heartbeat is back is left alone, and so is every node while the taker's own
# heartbeat is not on this server (see _OWN). A dead consumer with nothing pending is
# deleted (atomically, so no entry delivered to it meanwhile can be dropped).
TAKEOVER_LUA = _OWN + """
if redis.call('EXISTS', KEYS[1]) == 1 then return {} end
if not soaf_own(KEYS[3], ARGV[5]) then return {} end
local pending = redis.call('XPENDING', KEYS[2], ARGV[1], '-', '+', ARGV[4], ARGV[2])
if #pending == 0 then
  redis.call('XGROUP', 'DELCONSUMER', KEYS[2], ARGV[1], ARGV[2])
  return {}
end
local ids = {}
for i, p in ipairs(pending) do ids[i] = p[1] end
return redis.call('XCLAIM', KEYS[2], ARGV[1], ARGV[3], 0, unpack(ids))
"""

# KEYS: heartbeat | ARGV: value, token, ttl ms. 1: renewed; 2: written, the key was missing;
# 0: the key holds another token (nothing written).
REFRESH_LUA = """
local t = redis.call('TYPE', KEYS[1])['ok']
if t ~= 'none' and t ~= 'string' then redis.call('DEL', KEYS[1]) end
local cur = redis.call('GET', KEYS[1])
if cur then
  local ok, v = pcall(cjson.decode, cur)
  if ok and type(v) == 'table' and v['token'] and v['token'] ~= ARGV[2] then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
if cur then return 1 end
return 2
"""

# KEYS: heartbeat | ARGV: value, expected current value ('' for none), ttl ms
CAS_LUA = """
local cur = redis.call('GET', KEYS[1])
if (not cur and ARGV[2] == '') or cur == ARGV[2] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
  return 1
end
return 0
"""

# KEYS: heartbeat | ARGV: token. Deletes the key only if it is this core's.
RELEASE_LUA = """
local cur = redis.call('GET', KEYS[1])
if not cur then return 0 end
local ok, v = pcall(cjson.decode, cur)
if ok and type(v) == 'table' and v['token'] == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: the node's counter | ARGV: the last number this process used
# Returns the next number: one more than both the counter and the process's own.
NEXT_NUMBER_LUA = """
local n = redis.call('INCR', KEYS[1])
local floor = tonumber(ARGV[1]) + 1
if n < floor then
  redis.call('SET', KEYS[1], floor)
  n = floor
end
return n
"""
