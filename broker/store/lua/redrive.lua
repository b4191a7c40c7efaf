-- redrive.lua: move dead letters of one queue back to pending with a fresh set of attempts.
-- Their errors are kept.
--
-- KEYS[1]  tb:{q}:dead        zset  id -> dead-letter time (ms)
-- KEYS[2]  tb:{q}:pending     zset  id -> pending score
-- ARGV     (store/argv.py RedriveArgs)
--   task_prefix   tb:{q}:t:   (derived task keys, same hash tag)
--   wake_channel, queue   published to when tasks go back to pending
--   then task ids (local part); ids that are not dead letters are skipped
--
-- Returns the number of tasks redriven.

local now = now_ms()
local task_prefix, wake_channel, queue = unpack(ARGV, 1, 3)
local moved = 0
for _, id in ipairs({unpack(ARGV, 3 + 1)}) do
  if redis.call('ZREM', KEYS[1], id) == 1 then
    local key = task_prefix .. id
    if redis.call('EXISTS', key) == 1 then
      redis.call('HSET', key, 'att', 0)
      redis.call('HDEL', key, 'ftime', 'slid', 'skind')
      to_pending(key, id, KEYS[2], now)
      moved = moved + 1
    end
  end
end
if moved > 0 then redis.call('PUBLISH', wake_channel, queue) end
return moved
