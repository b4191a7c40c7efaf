-- delete_dead.lua: delete dead letters of one queue for good.
--
-- KEYS[1]  tb:{q}:dead        zset  id -> dead-letter time (ms)
-- ARGV     (store/argv.py DeleteDeadArgs)
--   task_prefix   tb:{q}:t:   (derived task keys, same hash tag)
--   then task ids (local part); ids that are not dead letters are skipped
--
-- Returns the number of tasks deleted.

local task_prefix = unpack(ARGV, 1, 1)
local deleted = 0
for _, id in ipairs({unpack(ARGV, 1 + 1)}) do
  if redis.call('ZREM', KEYS[1], id) == 1 then
    redis.call('DEL', task_prefix .. id)
    deleted = deleted + 1
  end
end
return deleted
