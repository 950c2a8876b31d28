"""Fleet-wide concurrency slots: the Lua that caps how many runs of a service go at once.

A service class with ``max_concurrent = N`` runs at most N at a time across every core
sharing the Redis. Its slots are one sorted set per service name (``Keys.slots``):
member the service id, score the time (seconds since the epoch) its lease runs out.
A core takes a slot before it claims the entry (TAKE_SLOT), renews the leases of its
running services with every heartbeat interval (``ZADD XX``), and gives the slot back
when the run ends for any reason: final state, put back when the core stops, claim not
granted (``ZREM``). A core killed with -9 renews nothing: its leases run out after the
heartbeat TTL, and TAKE_SLOT drops expired leases before it counts, so the slots of a
lost core's attempts come free when that core counts as dead; the core that re-runs or
adopts such an attempt takes its slot again, past the cap if need be (``force``), as
admission does for runs a core already owns; the one that ends such a service instead
(lost too often) removes its lease. Leases compare clocks of several hosts:
keep them in sync (NTP), as the heartbeats already require.

"""

from __future__ import annotations

from soaf.protocol.scripts.script import Script

# KEYS[1] the service name's slots (zset). ARGV: service id, cap, now, lease end, force (1/0).
# Returns {1, count, added} when the id holds a slot (added: 1 if taken by this call, 0 if
# it held one already), {0, count, 0} when the service is at its cap.
TAKE_SLOT_LUA = """
local t = redis.call('TYPE', KEYS[1])['ok']
if t ~= 'none' and t ~= 'zset' then redis.call('DEL', KEYS[1]) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
local held = redis.call('ZSCORE', KEYS[1], ARGV[1])
local count = redis.call('ZCARD', KEYS[1])
if held or ARGV[5] == '1' or count < tonumber(ARGV[2]) then
  local added = redis.call('ZADD', KEYS[1], ARGV[4], ARGV[1])
  return {1, redis.call('ZCARD', KEYS[1]), added}
end
return {0, count, 0}
"""

TAKE_SLOT = Script(TAKE_SLOT_LUA)
