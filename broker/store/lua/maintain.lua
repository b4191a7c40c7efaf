-- maintain.lua: all time-driven work of one queue in one call: expired leases reclaimed, due
-- scheduled and retrying tasks promoted, finished tasks and dead letters past retention deleted.
-- Returns the queue's next due time, which the due index (settle_due.lua) keeps.
--
-- KEYS[1]  tb:{q}:leased      zset  id -> lease expiry (ms)
-- KEYS[2]  tb:{q}:pending     zset  id -> pending score
-- KEYS[3]  tb:{q}:dead        zset  id -> dead-letter time (ms)
-- KEYS[4]  tb:{q}:stats       hash  running totals
-- KEYS[5]  tb:{q}:scheduled   zset  id -> due time (ms)
-- KEYS[6]  tb:{q}:done        zset  id -> finish time (ms)
-- KEYS[7]  tb:{q}:meta        hash  queue settings (paused, limits)
-- KEYS[8]  tb:{q}:fp          zset  priorities that have a fresh stream (enqueue.lua)
-- ARGV     (store/argv.py MaintainArgs)
--   task_prefix   tb:{q}:t:   (derived task keys, same hash tag)
--   wake_channel, queue   published to when tasks go back to pending
--   limit         at most this many of each kind of work per call
--   finished_retention_ms, dead_retention_ms
--   slack_ms      trimming waits this long past the retention, so a busy queue's
--          trims are batched instead of one call per finished task
--
-- Returns {reclaimed, promoted, trimmed, next_due, empty, outbox}: next_due is the earliest time
-- any work comes due (now when a limit was reached: call again; -1 when nothing will come due);
-- empty is 1 when the queue holds no task at all and has no settings (paused, limits); outbox
-- is how many workflow outbox entries wait to be moved (the caller starts its mover: while
-- there are any, the queue is due again within a second, so a mover that died is replaced).

local now = now_ms()
local task_prefix, wake_channel, queue, limit, finished_retention_ms, dead_retention_ms,
  slack_ms = unpack(ARGV, 1, 7)
limit = tonumber(limit)
local finished_ms, dead_ms = tonumber(finished_retention_ms), tonumber(dead_retention_ms)
local slack = tonumber(slack_ms)
local keys = {leased = KEYS[1], pending = KEYS[2], dead = KEYS[3], stats = KEYS[4]}

local reclaimed = reclaim_expired(keys, task_prefix, now, limit)
local promoted = promote_due(KEYS[5], KEYS[2], task_prefix, now, limit)
if reclaimed > 0 or promoted > 0 then redis.call('PUBLISH', wake_channel, queue) end

local full = reclaimed == limit or promoted == limit
local trimmed_done = trim_before(KEYS[6], task_prefix, now - finished_ms, limit)
local trimmed_dead = trim_before(KEYS[3], task_prefix, now - dead_ms, limit)
local trimmed = trimmed_done + trimmed_dead
if trimmed_done == limit or trimmed_dead == limit then full = true end

local next_due = -1
local function consider(t)
  if t >= 0 and (next_due < 0 or t < next_due) then next_due = t end
end
local function first(set_key)
  local f = redis.call('ZRANGE', set_key, 0, 0, 'WITHSCORES')
  if #f == 0 then return -1 end
  return tonumber(f[2])
end
consider(first(KEYS[1]))
consider(first(KEYS[5]))
local oldest_done, oldest_dead = first(KEYS[6]), first(KEYS[3])
if oldest_done >= 0 then consider(oldest_done + finished_ms + slack) end
if oldest_dead >= 0 then consider(oldest_dead + dead_ms + slack) end
local outbox = redis.call('XLEN', base_of_pending(KEYS[2]) .. 'wf')
if outbox > 0 then consider(now + 1000) end
if full then next_due = now end

local empty = 0
if next_due < 0 and redis.call('ZCARD', KEYS[2]) == 0 and redis.call('ZCARD', KEYS[8]) == 0
    and not has_settings(KEYS[7]) and not has_grouped(base_of_pending(KEYS[2]))
    and not has_workflow(base_of_pending(KEYS[2])) then
  empty = 1
end
return {reclaimed, promoted, trimmed, next_due, empty, outbox}
