-- ack.lua: settle leased tasks of one queue as succeeded, each only if its lease is current.
--
-- KEYS[1]  tb:{q}:leased      zset  id -> lease expiry (ms)
-- KEYS[2]  tb:{q}:done        zset  id -> finish time (ms), trimmed after the retention
-- KEYS[3]  tb:{q}:stats       hash  running totals
-- KEYS[4]  tb:{q}:meta        hash  queue settings ('blocked': wake_if_blocked)
-- ARGV     (store/argv.py AckArgs, AckItem)
--   task_prefix   tb:{q}:t:   (derived task keys, same hash tag)
--   wake_channel, queue   published to when an ack frees a slot of a queue at max_concurrency
--   n; then n items: id lease_id result holder (the presenting principal, '' without a policy;
--   a current lease bound to another is refused)
--
-- Lease identity is the fence: an ack that arrives after the deadline but before any replica
-- reclaimed the task is accepted, since nobody else holds the task.
-- Returns {now, r_1 .. r_n}, r_i = 'ok', 'again' (this lease was already acked: a harmless repeat),
-- 'stale' (the lease is not current), 'foreign' (current, but another principal's) or 'nf'
-- (no such task).

local now = now_ms()
-- Numbers passed to redis.call are formatted per use (sprintf); these once per call.
local now_text, succeeded_text = tostring(now), tostring(SUCCEEDED)
local task_prefix, wake_channel, queue, n = unpack(ARGV, 1, 4)
n = tonumber(n)
local reply = {now}
local acked = 0
local unleased, finished = {}, {}  -- members for one ZREM and one ZADD (bulk_call)
local base = base_of_tasks(task_prefix)
for i = 0, n - 1 do
  local id, lease_id, result, holder = item(4, 4, i)
  local key = task_prefix .. id
  local current = redis.call('HMGET', key, 'state', 'lid', 'slid', 'skind', 'lp', 'gk', 'kid', 'w')
  if not current[1] then
    table.insert(reply, 'nf')
  elseif tonumber(current[1]) == LEASED and current[2] == lease_id and foreign(current[5], holder) then
    table.insert(reply, 'foreign')
  elseif tonumber(current[1]) == LEASED and current[2] == lease_id then
    unleased[#unleased + 1] = id
    group_lease_ended(base, current[6], wake_channel, queue)
    clear_lease(key)
    redis.call('HSET', key, 'state', succeeded_text, 'ftime', now_text, 'slid', lease_id, 'skind', 'a')
    if result ~= '' then redis.call('HSET', key, 'res', result) end
    finished[#finished + 1] = now_text
    finished[#finished + 1] = id
    task_finished(base, id, SUCCEEDED, current[7], current[8])
    acked = acked + 1
    table.insert(reply, 'ok')
  elseif current[3] == lease_id and current[4] == 'a' then
    table.insert(reply, 'again')
  else
    table.insert(reply, 'stale')
  end
end
if acked > 0 then
  bulk_call('ZREM', KEYS[1], unleased)
  bulk_call('ZADD', KEYS[2], finished)
  redis.call('HINCRBY', KEYS[3], 'ok', acked)
  wake_if_blocked(KEYS[4], wake_channel, queue)
end
return reply
