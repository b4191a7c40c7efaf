-- unlease.lua: undo leases whose tasks were never sent to the worker (its stream ended, or was cut
-- for not reading, before the delivery was written): no attempt is spent and no error recorded;
-- the task goes back to pending in the place it had (same priority and ready time).
--
-- KEYS[1]  tb:{q}:leased      zset  id -> lease expiry (ms)
-- KEYS[2]  tb:{q}:pending     zset  id -> pending score
-- ARGV     (store/argv.py UnleaseArgs, HeldItem)
--   task_prefix   tb:{q}:t:   (derived task keys, same hash tag)
--   wake_channel, queue   published to when a task goes back to pending
--   stream_id     the stream the leases were made for: a lease no longer held by it is left alone
--   n; then n items: id lease_id
--
-- Returns the number of leases undone.

local task_prefix, wake_channel, queue, stream_id, n = unpack(ARGV, 1, 5)
n = tonumber(n)
local undone = 0
for i = 0, n - 1 do
  local id, lease_id = item(5, 2, i)
  local key = task_prefix .. id
  local t = redis.call('HMGET', key, 'state', 'lid', 'sid', 'pri', 'stime', 'gk')
  if t[1] and tonumber(t[1]) == LEASED and t[2] == lease_id and t[3] == stream_id then
    redis.call('ZREM', KEYS[1], id)
    group_lease_ended(base_of_tasks(task_prefix), t[6], nil, nil)  -- woken below
    clear_lease(key)
    redis.call('HINCRBY', key, 'att', -1)
    redis.call('HSET', key, 'state', PENDING)
    add_pending(id, KEYS[2], pending_score(tonumber(t[4] or '0'), tonumber(t[5])), t[6])
    undone = undone + 1
  end
end
if undone > 0 then redis.call('PUBLISH', wake_channel, queue) end
return undone
