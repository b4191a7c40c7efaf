-- cancel.lua: cancel a task that has not finished; a held lease is revoked with it.
--
-- KEYS[1]  tb:{q}:t:<id>      task hash
-- KEYS[2]  tb:{q}:pending     zset
-- KEYS[3]  tb:{q}:scheduled   zset
-- KEYS[4]  tb:{q}:leased      zset
-- KEYS[5]  tb:{q}:done        zset  id -> finish time (ms)
-- KEYS[6]  tb:{q}:stats       hash
-- KEYS[7]  tb:{q}:fp          zset  priorities that have a fresh stream
-- KEYS[8]  tb:{q}:meta        hash  queue settings ('blocked': wake_if_blocked)
-- ARGV     (store/argv.py CancelArgs)
--   id       task id (local part)
--   entry_id, fresh_prefix   where the task is if it is still fresh (no hash yet): it gets one
--   wake_channel, queue   published to when cancelling a lease frees a slot of a queue at its
--                         max_concurrency
--
-- A WAITING task (issue 17) is cancelled too; a cancelled task's own children hear of it through
-- its queue's outbox (prelude's task_finished).
-- Returns {'ok', lease_id or ''} when cancelled, {'final', state} when already finished, {'nf'}.

local now = now_ms()
local id, entry_id, fresh_prefix, wake_channel, queue = unpack(ARGV, 1, 5)
local t = redis.call('HMGET', KEYS[1], 'state', 'lid', 'gk')
if not t[1] then
  local stream, pri, f = find_fresh(fresh_prefix, KEYS[7], id, entry_id)
  if not stream then return {'nf'} end
  redis.call('XDEL', stream, entry_id)
  drop_if_empty(stream, KEYS[7], pri)
  fresh_to_hash(KEYS[1], pri, entry_id, f)
  t = {tostring(PENDING), false, false}
end
local state = tonumber(t[1])
local base = base_of_pending(KEYS[2])
if state == WAITING then
  cancel_waiting(base, id, now)
  return {'ok', ''}
end
if state ~= SCHEDULED and state ~= PENDING and state ~= LEASED then return {'final', state} end
if t[3] and state == PENDING then remove_grouped(base, t[3], id) end
if state == LEASED then group_lease_ended(base, t[3], wake_channel, queue) end
redis.call('ZREM', KEYS[2], id)
redis.call('ZREM', KEYS[3], id)
if redis.call('ZREM', KEYS[4], id) == 1 then wake_if_blocked(KEYS[8], wake_channel, queue) end
clear_lease(KEYS[1])
redis.call('HSET', KEYS[1], 'state', CANCELLED, 'ftime', now)
redis.call('ZADD', KEYS[5], now, id)
redis.call('HINCRBY', KEYS[6], 'cancel', 1)
task_finished(base, id, CANCELLED)
return {'ok', t[2] or ''}
