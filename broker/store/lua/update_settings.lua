-- update_settings.lua: change a queue's settings (store/queue_meta.py names the fields).
--
-- KEYS[1]  tb:{q}:meta   hash  queue settings
-- ARGV     (store/argv.py UpdateSettingsArgs)
--   wake_channel, queue   published to, so every replica's pumps lease under the new limits
--   n_delete; then n_delete field names to delete; then field, value pairs to set
--
-- Returns the meta hash after the change (HGETALL). (It derives the queue's other keys from
-- the meta key's name: all share its hash tag.)

local wake_channel, queue, n_delete = unpack(ARGV, 1, 3)
n_delete = tonumber(n_delete)
if n_delete > 0 then redis.call('HDEL', KEYS[1], unpack(ARGV, 4, 3 + n_delete)) end
if #ARGV > 3 + n_delete then redis.call('HSET', KEYS[1], unpack(ARGV, 4 + n_delete)) end
-- Keys parked at per_key_max_concurrency or waiting for a per-key token go back into the group
-- rotation: the limit may have been raised or lifted (one still over the new one is parked
-- again by its next lease call).
local base = string.sub(KEYS[1], 1, -5)  -- tb:{q}:meta
local turn = tonumber(redis.call('HGET', KEYS[1], 'turn') or '0')
for _, gk in ipairs(redis.call('SMEMBERS', base .. 'gp')) do
  redis.call('ZADD', base .. 'gk', 'NX', turn, gk)
end
redis.call('DEL', base .. 'gp')
for _, gk in ipairs(redis.call('ZRANGE', base .. 'gw', 0, -1)) do  -- waiting for a key's token
  redis.call('ZADD', base .. 'gk', 'NX', turn, gk)
end
redis.call('DEL', base .. 'gw')
redis.call('PUBLISH', wake_channel, queue)
return redis.call('HGETALL', KEYS[1])
