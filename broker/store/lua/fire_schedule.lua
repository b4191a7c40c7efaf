-- fire_schedule.lua: one step of a schedule: check its next tick is the one the caller read,
-- store that tick's task as enqueue.lua stores a task, and advance the next tick, atomically,
-- so however many replicas try the same tick only one stores its task.
--
-- KEYS[1]  tb:{q}:sched:<name>  hash  the schedule (store/schedule_store.py names its fields;
--                                      the template's use the task hash's names)
-- KEYS[2]  tb:{q}:pending       zset  id -> pending score
-- KEYS[3]  tb:{q}:scheduled     zset  id -> due time (ms)
-- KEYS[4]  tb:{q}:stats         hash  running totals
-- ARGV     (store/argv.py FireScheduleArgs)
--   task_prefix           tb:{q}:t:     (the task's hash is derived from its id: same hash tag)
--   idempotency_prefix    tb:{q}:idem:  (derived key, same hash tag)
--   idempotency_window_ms
--   wake_channel, queue   published to so idle dispatchers wake at once
--   expected_next         the next tick (ms) the caller read; '' for a trigger (checks nothing)
--   new_next              the next tick after this step; '' to leave it
--   tick                  the tick whose task to store; '' for none (missed ticks skipped)
--   due                   when the task is due (ms); '' for now
--   id                    the new task's local id
--   idempotency_key       hashed, as enqueue.lua's; the task of a tick already stored under it
--                         is not stored again
--   body_hash
--   name                  the schedule's name, for the task's headers
--
-- The task gets the template's headers plus taskbroker-schedule (the name) and taskbroker-tick
-- (the tick, ms), so its handler knows which tick it runs for.
-- Returns {outcome, task local id or '', now, next or ''}: outcome 'fired', 'skipped' (advanced
-- without a task), 'paused', 'moved' (the next tick is not expected_next), 'early' (not due by
-- Redis's clock) or 'gone' (deleted).

local now = now_ms()
local task_prefix, idempotency_prefix, idempotency_window_ms, wake_channel, queue,
  expected_next, new_next, tick, due, id, idempotency_key, body_hash, name = unpack(ARGV, 1, 13)
local s = KEYS[1]
if redis.call('EXISTS', s) == 0 then return {'gone', '', now, ''} end
local next_tick = redis.call('HGET', s, 'next') or ''
if expected_next ~= '' then
  if redis.call('HGET', s, 'paused') == '1' then return {'paused', '', now, next_tick} end
  if next_tick ~= expected_next then return {'moved', '', now, next_tick} end
  if tonumber(expected_next) > now then return {'early', '', now, next_tick} end
end
if new_next ~= '' then
  redis.call('HSET', s, 'next', new_next)
  next_tick = new_next
end
if tick == '' then return {'skipped', '', now, next_tick} end

local prior = redis.call('GET', idempotency_prefix .. idempotency_key)
local task_id = id
if prior then
  task_id = string.sub(prior, 1, string.find(prior, '|', 1, true) - 1)
else
  local t = redis.call('HMGET', s, 'type', 'payload', 'pri', 'max', 'bo_i', 'bo_m', 'hdr',
    'lease_ms', 'gk')
  local headers = {}
  if t[7] and t[7] ~= '' then headers = cjson.decode(t[7]) end
  headers['taskbroker-schedule'] = name
  headers['taskbroker-tick'] = tick
  local at = now
  if due ~= '' then at = math.max(now, tonumber(due)) end
  store_task_hash(task_prefix .. id, id, {type = t[1], payload = t[2], pri = tonumber(t[3]),
    max = t[4], bo_i = t[5], bo_m = t[6], hdr = cjson.encode(headers), lease_ms = t[8],
    gk = t[9]}, now, at, KEYS[2], KEYS[3])
  redis.call('SET', idempotency_prefix .. idempotency_key, id .. '|' .. body_hash, 'PX',
    idempotency_window_ms)
  redis.call('HINCRBY', KEYS[4], 'enq', 1)
  redis.call('PUBLISH', wake_channel, queue)
end
redis.call('HSET', s, 'ltick', tick, 'ltask', task_id, 'lfire', now)
return {'fired', task_id, now, next_tick}
