-- redrive.lua: move dead letters of one queue back to pending with a fresh set of attempts.
-- Their errors are kept.
--
-- KEYS[1]  tb:{q}:dead        zset  id -> dead-letter time (ms)
-- KEYS[2]  tb:{q}:pending     zset  id -> pending score
-- ARGV[1]  task key prefix tb:{q}:t:   (derived task keys, same hash tag)
-- ARGV[2]  wake channel, ARGV[3] queue name
-- ARGV[4..] task ids (local part); ids that are not dead letters are skipped
--
-- Returns the number of tasks redriven.

local now = now_ms()
local prefix = ARGV[1]
local moved = 0
for i = 4, #ARGV do
  local id = ARGV[i]
  if redis.call('ZREM', KEYS[1], id) == 1 then
    local key = prefix .. id
    if redis.call('EXISTS', key) == 1 then
      redis.call('HSET', key, 'att', 0)
      redis.call('HDEL', key, 'ftime', 'slid', 'skind')
      to_pending(key, id, KEYS[2], now)
      moved = moved + 1
    end
  end
end
if moved > 0 then redis.call('PUBLISH', ARGV[2], ARGV[3]) end
return moved
