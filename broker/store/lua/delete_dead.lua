-- delete_dead.lua: delete dead letters of one queue for good.
--
-- KEYS[1]  tb:{q}:dead        zset  id -> dead-letter time (ms)
-- ARGV     (store/argv.py DeleteDeadArgs)
--   task_prefix   tb:{q}:t:   (derived task keys, same hash tag)
--   then task ids (local part); ids that are not dead letters are skipped
--
-- A deleted parent tells its children it is gone (as CANCELLED: prelude's task_finished), so
-- those waiting for its redrive are cancelled.
-- Returns the number of tasks deleted.

local task_prefix = unpack(ARGV, 1, 1)
local base = base_of_tasks(task_prefix)
local deleted = 0
for _, id in ipairs({unpack(ARGV, 1 + 1)}) do
  if redis.call('ZREM', KEYS[1], id) == 1 then
    local key = task_prefix .. id
    local kid = redis.call('HGET', key, 'kid')
    if kid then task_finished(base, id, CANCELLED, kid, false) end
    redis.call('DEL', key, key .. ':p', key .. ':k')
    deleted = deleted + 1
  end
end
return deleted
