-- reclaim_expired.lua: return tasks whose lease expired to pending, or to dead letters when out of
-- attempts. Idempotent, so every broker replica may run it.
--
-- KEYS[1]  tb:{q}:leased      zset  id -> lease expiry (ms)
-- KEYS[2]  tb:{q}:pending     zset  id -> pending score
-- KEYS[3]  tb:{q}:dead        zset  id -> dead-letter time (ms)
-- KEYS[4]  tb:{q}:stats       hash  running totals
-- ARGV     (store/argv.py ReclaimArgs)
--   task_prefix   tb:{q}:t:   (derived task keys, same hash tag)
--   wake_channel, queue   published to when a task goes back to pending
--   limit         at most this many per call (the caller loops while the count is full)
--
-- Returns {count, next_expiry}: next_expiry is the earliest remaining lease expiry (-1 if none).

local now = now_ms()
local task_prefix, wake_channel, queue, limit = unpack(ARGV, 1, 4)
local keys = {leased = KEYS[1], pending = KEYS[2], dead = KEYS[3], stats = KEYS[4]}
local reclaimed = reclaim_expired(keys, task_prefix, now, tonumber(limit))
if reclaimed > 0 then redis.call('PUBLISH', wake_channel, queue) end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local next_expiry = -1
if #first > 0 then next_expiry = tonumber(first[2]) end
return {reclaimed, next_expiry}
