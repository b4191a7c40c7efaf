-- delete_dead.lua: delete dead letters of one queue for good.
--
-- KEYS[1]  tb:{q}:dead        zset  id -> dead-letter time (ms)
-- ARGV[1]  task key prefix tb:{q}:t:   (derived task keys, same hash tag)
-- ARGV[2..] task ids (local part); ids that are not dead letters are skipped
--
-- Returns the number of tasks deleted.

local deleted = 0
for i = 2, #ARGV do
  if redis.call('ZREM', KEYS[1], ARGV[i]) == 1 then
    redis.call('DEL', ARGV[1] .. ARGV[i])
    deleted = deleted + 1
  end
end
return deleted
