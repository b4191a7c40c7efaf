-- reclaim_expired.lua: return tasks whose lease expired to pending, or to dead letters when out of
-- attempts. Idempotent, so every broker replica may run it.
--
-- KEYS[1]  tb:{q}:leased      zset  id -> lease expiry (ms)
-- KEYS[2]  tb:{q}:pending     zset  id -> pending score
-- KEYS[3]  tb:{q}:dead        zset  id -> dead-letter time (ms)
-- KEYS[4]  tb:{q}:stats       hash  running totals
-- ARGV[1]  task key prefix tb:{q}:t:   (derived task keys, same hash tag)
-- ARGV[2]  wake channel, ARGV[3] queue name
-- ARGV[4]  at most this many per call (the caller loops while the count is full)
--
-- Returns {count, next_expiry}: next_expiry is the earliest remaining lease expiry (-1 if none).

local now = now_ms()
local prefix = ARGV[1]
local keys = {leased = KEYS[1], pending = KEYS[2], dead = KEYS[3], stats = KEYS[4]}
local reclaimed = reclaim_expired(keys, prefix, now, tonumber(ARGV[4]))
if reclaimed > 0 then redis.call('PUBLISH', ARGV[2], ARGV[3]) end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local next_expiry = -1
if #first > 0 then next_expiry = tonumber(first[2]) end
return {reclaimed, next_expiry}
