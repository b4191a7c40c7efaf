-- lease.lua: lease up to n tasks of one queue, highest priority first, FIFO within a priority.
-- Due scheduled tasks are promoted first, so a delayed task needs no separate pass to run on time.
--
-- KEYS[1]  tb:{q}:pending     zset  id -> pending score
-- KEYS[2]  tb:{q}:scheduled   zset  id -> due time (ms)
-- KEYS[3]  tb:{q}:leased      zset  id -> lease expiry (ms)
-- KEYS[4]  tb:{q}:meta        hash  queue settings (paused)
-- KEYS[5]  tb:{q}:fp          zset  priorities that have a fresh stream, scored -priority
-- ARGV     (store/argv.py LeaseArgs, LeaseSlot)
--   task_prefix   tb:{q}:t:   (task hashes are derived from popped ids: same hash tag)
--   fresh_prefix  tb:{q}:f:   (fresh pending tasks, a stream per priority: enqueue.lua)
--   n; then n slots: lease_id (fresh, random), lease_ms (for a task without its own),
--   stream_id (the Lease stream the slot belongs to, stored as `sid`: the stream that holds
--   the lease) and holder (the principal the lease is bound to, stored as `lp`; '' without a
--   policy). Slots are filled in order, so the caller knows which stream each leased task
--   belongs to. Then the names of the task fields to return.
--
-- Pending tasks are in two places: fresh ones in their priority's stream, the others (retried,
-- promoted, redriven, or stored out of stream order) in the pending zset. Both are read in
-- pending-score order (priority, then ready time) and merged, a fresh task getting its hash as
-- it is leased.
--
-- Returns {now, next_due, paused, id_1, fields_1, id_2, fields_2, ...}: next_due is the earliest
-- scheduled time (-1 when none), paused is 1 when nothing was leased because the queue is paused,
-- fields_i is the leased task's values of the named fields, in order (HMGET).

local now = now_ms()
local task_prefix, fresh_prefix, n = unpack(ARGV, 1, 3)
n = tonumber(n)
local fields = {unpack(ARGV, 3 + 4 * n + 1)}
if redis.call('HGET', KEYS[4], 'paused') == '1' then
  return {now, next_due(KEYS[2]), 1}
end
-- Bounded so one call stays short even when a backlog of delayed tasks comes due at once.
promote_due(KEYS[2], KEYS[1], task_prefix, now, 1000)

-- Up to n candidates from each place, in score order.
local held = redis.call('ZRANGE', KEYS[1], 0, n - 1, 'WITHSCORES')
local fresh = {}
for _, pri in ipairs(redis.call('ZRANGE', KEYS[5], 0, -1)) do
  if #fresh >= n then break end
  local stream = fresh_prefix .. pri
  local entries = redis.call('XRANGE', stream, '-', '+', 'COUNT', n - #fresh)
  if #entries == 0 then drop_if_empty(stream, KEYS[5], pri) end
  for _, e in ipairs(entries) do
    local p = tonumber(pri)
    table.insert(fresh, {pending_score(p, entry_ms(e[1])), stream, e[1], p, e[2]})
  end
end

local reply = {now, next_due(KEYS[2]), 0}
local used = 0
local function lease(key, id)
  used = used + 1
  local lease_id, lease_ms, stream_id, holder = item(3, 4, used - 1)
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

local h, f = 1, 1
local touched = {}  -- fresh streams taken from: stream -> priority
for _ = 1, n do
  local from_held = h <= #held and (f > #fresh or tonumber(held[h + 1]) <= fresh[f][1])
  if from_held then
    local id = held[h]
    h = h + 2
    redis.call('ZREM', KEYS[1], id)
    local key = task_prefix .. id
    if redis.call('EXISTS', key) == 1 then lease(key, id) end
  elseif f <= #fresh then
    local _, stream, entry_id, pri, flat = unpack(fresh[f])
    f = f + 1
    redis.call('XDEL', stream, entry_id)
    touched[stream] = pri
    local task = fresh_fields(flat)
    local key = task_prefix .. task.id
    fresh_to_hash(key, pri, entry_id, task)
    lease(key, task.id)
  else
    break
  end
end
for stream, pri in pairs(touched) do drop_if_empty(stream, KEYS[5], pri) end
return reply
