"""Named pipelines: the Lua that records which service a pipeline's step got.

A step's entry is written before its service is submitted, and only if the entry is
still the one its client read (compare-and-set), so two runs of the same script at
once cannot both submit a step: the second one reads the first one's entry again and
attaches to it.
"""

from __future__ import annotations

from soaf.protocol.scripts.script import Script

# KEYS[1] the pipeline's hash, KEYS[2] the pipelines zset.
# ARGV: step name, the entry read before ('' for none), the new entry, pipeline name, now,
# the token of the client's run, the seconds the pipeline's hash is kept after this step.
# Returns 1 when the new entry is recorded, 0 when the entry
# changed meanwhile, -1 when this run was cancelled (``-cancelled`` holds its token).
RECORD_STEP_LUA = """
local t = redis.call('TYPE', KEYS[1])['ok']
if t ~= 'none' and t ~= 'hash' then redis.call('DEL', KEYS[1]) end
if redis.call('HGET', KEYS[1], '-cancelled') == ARGV[6] then return -1 end
local current = redis.call('HGET', KEYS[1], ARGV[1]) or ''
if current ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[7])
local z = redis.call('TYPE', KEYS[2])['ok']
if z ~= 'none' and z ~= 'zset' then redis.call('DEL', KEYS[2]) end
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[4])
return 1
"""

RECORD_STEP = Script(RECORD_STEP_LUA)
