-- update_settings.lua: change a queue's settings (store/queue_meta.py names the fields).
--
-- KEYS[1]  tb:{q}:meta   hash  queue settings
-- ARGV     (store/argv.py UpdateSettingsArgs)
--   wake_channel, queue   published to, so every replica's pumps lease under the new limits
--   n_delete; then n_delete field names to delete; then field, value pairs to set
--
-- Returns the meta hash after the change (HGETALL).

local wake_channel, queue, n_delete = unpack(ARGV, 1, 3)
n_delete = tonumber(n_delete)
if n_delete > 0 then redis.call('HDEL', KEYS[1], unpack(ARGV, 4, 3 + n_delete)) end
if #ARGV > 3 + n_delete then redis.call('HSET', KEYS[1], unpack(ARGV, 4 + n_delete)) end
redis.call('PUBLISH', wake_channel, queue)
return redis.call('HGETALL', KEYS[1])
