-- lease.lua: lease up to n tasks of one queue, highest priority first, FIFO within a priority.
-- Due scheduled tasks are promoted first, so a delayed task needs no separate pass to run on time.
--
-- KEYS[1]  tb:{q}:pending     zset  id -> pending score
-- KEYS[2]  tb:{q}:scheduled   zset  id -> due time (ms)
-- KEYS[3]  tb:{q}:leased      zset  id -> lease expiry (ms)
-- KEYS[4]  tb:{q}:meta        hash  queue settings (paused)
-- ARGV     (store/argv.py LeaseArgs, LeaseSlot)
--   task_prefix   tb:{q}:t:   (task hashes are derived from popped ids: same hash tag)
--   n; then n slots: lease_id (fresh, random), lease_ms (for a task without its own),
--   stream_id (the Lease stream the slot belongs to, stored as `sid`: the stream that holds
--   the lease) and holder (the principal the lease is bound to, stored as `lp`; '' without a
--   policy). Slots are filled in order, so the caller knows which stream each leased task
--   belongs to. Then the names of the task fields to return.
--
-- Returns {now, next_due, paused, id_1, fields_1, id_2, fields_2, ...}: next_due is the earliest
-- scheduled time (-1 when none), paused is 1 when nothing was leased because the queue is paused,
-- fields_i is the leased task's values of the named fields, in order (HMGET).

local now = now_ms()
local task_prefix, n = unpack(ARGV, 1, 2)
n = tonumber(n)
local fields = {unpack(ARGV, 2 + 4 * n + 1)}
if redis.call('HGET', KEYS[4], 'paused') == '1' then
  return {now, next_due(KEYS[2]), 1}
end
-- Bounded so one call stays short even when a backlog of delayed tasks comes due at once.
promote_due(KEYS[2], KEYS[1], task_prefix, now, 1000)

local reply = {now, next_due(KEYS[2]), 0}
local popped = redis.call('ZPOPMIN', KEYS[1], n)
local used = 0
for i = 1, #popped, 2 do
  local id = popped[i]
  local key = task_prefix .. id
  if redis.call('EXISTS', key) == 1 then
    used = used + 1
    local lease_id, lease_ms, stream_id, holder = item(2, 4, used - 1)
    local ms = tonumber(lease_ms)
    local own = tonumber(redis.call('HGET', key, 'lease_ms') or '0')
    if own > 0 then ms = own end
    local expire = now + ms
    redis.call('HINCRBY', key, 'att', 1)
    redis.call('HSET', key, 'state', LEASED, 'lid', lease_id, 'etime', expire, 'cur_ms', ms,
      'sid', stream_id)
    bind_lease(key, holder)
    redis.call('ZADD', KEYS[3], expire, id)
    table.insert(reply, id)
    table.insert(reply, redis.call('HMGET', key, unpack(fields)))
  end
end
return reply
