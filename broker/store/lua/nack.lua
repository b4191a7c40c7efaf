-- nack.lua: settle leased tasks of one queue as failed: retry after a backoff, or dead-letter.
--
-- KEYS[1]  tb:{q}:leased      zset  id -> lease expiry (ms)
-- KEYS[2]  tb:{q}:scheduled   zset  id -> due time (ms)
-- KEYS[3]  tb:{q}:pending     zset  id -> pending score
-- KEYS[4]  tb:{q}:dead        zset  id -> dead-letter time (ms)
-- KEYS[5]  tb:{q}:stats       hash  running totals
-- KEYS[6]  tb:{q}:meta        hash  queue settings ('blocked': wake_if_blocked)
-- ARGV     (store/argv.py NackArgs, NackItem)
--   task_prefix   tb:{q}:t:   (derived task keys, same hash tag)
--   wake_channel, queue   published to when a task is retried, or a slot of a queue at its
--                         max_concurrency is freed
--   n; then n items: id lease_id message retry_delay_ms dead_letter jitter holder
--          retry_delay_ms -1: use the task's backoff; dead_letter '1': skip retries;
--          jitter: a uniform draw in [0, 1) from the broker; holder: the presenting principal
--          ('' without a policy; a current lease bound to another is refused).
--
-- The backoff is evaluated here because only the script knows the attempt number atomically.
-- Equal jitter: never sooner than half the nominal delay, so retries still spread out but a
-- dependency that is down for a while is not hammered at once (AWS architecture blog,
-- "Exponential Backoff And Jitter"): nominal = min(max_backoff, initial_backoff * 2^(attempt - 1)),
-- delay = nominal / 2 + jitter * nominal / 2.
-- Returns {now, r_1, .. r_n}; r_i = {'ok'|'again', state, retry_time_ms} or {'stale'},
-- {'foreign'} (current, but another principal's) or {'nf'}.

local now = now_ms()
local task_prefix, wake_channel, queue, n = unpack(ARGV, 1, 4)
n = tonumber(n)
local reply = {now}
local woke = false
local freed = false
for i = 0, n - 1 do
  local id, lease_id, message, retry_delay_ms, dead_letter, jitter, holder = item(4, 7, i)
  local retry_ms = tonumber(retry_delay_ms)
  local key = task_prefix .. id
  local t = redis.call('HMGET', key, 'state', 'lid', 'slid', 'skind', 'att', 'max', 'bo_i', 'bo_m',
    'stime', 'lp', 'gk')
  if not t[1] then
    table.insert(reply, {'nf'})
  elseif tonumber(t[1]) == LEASED and t[2] == lease_id and foreign(t[10], holder) then
    table.insert(reply, {'foreign'})
  elseif tonumber(t[1]) == LEASED and t[2] == lease_id then
    local att, max = tonumber(t[5]), tonumber(t[6])
    redis.call('ZREM', KEYS[1], id)
    group_lease_ended(base_of_tasks(task_prefix), t[11], wake_channel, queue)
    freed = true
    clear_lease(key)
    redis.call('HSET', key, 'slid', lease_id, 'skind', 'n')
    append_error(key, att, now, message)
    redis.call('HINCRBY', KEYS[5], 'fail', 1)
    if dead_letter == '1' or att >= max then
      redis.call('HSET', key, 'state', DEAD, 'ftime', now)
      redis.call('ZADD', KEYS[4], now, id)
      redis.call('HINCRBY', KEYS[5], 'dead', 1)
      task_finished(base_of_tasks(task_prefix), id, DEAD)
      table.insert(reply, {'ok', DEAD, -1})
    else
      local delay = retry_ms
      if delay < 0 then
        local initial_backoff, max_backoff = tonumber(t[7]), tonumber(t[8])
        local cap = math.min(max_backoff, initial_backoff * math.pow(2, att - 1))
        delay = math.floor(cap / 2 + tonumber(jitter) * cap / 2)
      end
      local due = now + delay
      if delay > 0 then
        redis.call('HSET', key, 'state', SCHEDULED, 'stime', due)
        redis.call('ZADD', KEYS[2], due, id)
        table.insert(reply, {'ok', SCHEDULED, due})
      else
        to_pending(key, id, KEYS[3], now)
        table.insert(reply, {'ok', PENDING, now})
      end
      redis.call('HINCRBY', KEYS[5], 'retry', 1)
      woke = true
    end
  elseif t[3] == lease_id and t[4] == 'n' then
    local state = tonumber(t[1])
    local due = -1
    if state == SCHEDULED or state == PENDING then due = tonumber(t[9]) end
    table.insert(reply, {'again', state, due})
  else
    table.insert(reply, {'stale'})
  end
end
if woke then redis.call('PUBLISH', wake_channel, queue) end
if freed then wake_if_blocked(KEYS[6], wake_channel, queue) end
return reply
