-- resolve.lua: tell children of one queue how one of their parents ended (the outbox mover runs
-- it in the children's slot; docs/workflows.md). Idempotent: each child records each parent's
-- end once, so an outbox entry moved twice (a mover that died, two replicas) changes nothing.
--
-- KEYS[1]  tb:{c}:pending     zset
-- KEYS[2]  tb:{c}:scheduled   zset
-- ARGV     (store/argv.py ResolveArgs)
--   task_prefix   tb:{c}:t:   (the children's keys, same hash tag)
--   wake_channel, queue   published to when a child becomes pending
--   parent        the parent's task id (<queue>:<local id>)
--   state         how it ended: SUCCEEDED, DEAD or CANCELLED (a parent gone counts as CANCELLED)
--   result        its result ('' unless SUCCEEDED)
--   n; then n children's local ids
--
-- A child's policy (fpol) says what a failed parent does: c cancels it, r counts the parent as
-- ended, w keeps it waiting on a DEAD parent (a redrive may still succeed) and cancels it on a
-- CANCELLED one. A child whose last awaited parent is recorded is released: pending, or
-- scheduled when it has a delay (counted from now) or a later schedule time.
-- Returns {now, r_1 .. r_n}: 'nf' (no such child of this parent), 'again' (recorded already, or
-- the child ended), 'wait' (recorded; other parents awaited), 'held' (a DEAD parent the child
-- waits to see redriven), 'run' (released: pending), 'due:<ms>' (released: scheduled) or
-- 'cancel' (cancelled; its own children hear through its queue's outbox).

local now = now_ms()
local task_prefix, wake_channel, queue, parent, state, result, n = unpack(ARGV, 1, 7)
local pstate = tonumber(state)
local outcome = state
if pstate == SUCCEEDED then outcome = state .. result end
local base = base_of_tasks(task_prefix)
local reply = {now}
local woke = false
for i = 0, tonumber(n) - 1 do
  local id = item(7, 1, i)
  local key = task_prefix .. id
  local recorded = redis.call('HGET', key .. ':p', parent)
  local out
  if not recorded then
    out = 'nf'
  elseif recorded ~= '' then
    out = 'again'
  else
    local t = redis.call('HMGET', key, 'state', 'fpol', 'wdel', 'wat')
    if tonumber(t[1]) ~= WAITING then
      redis.call('HSET', key .. ':p', parent, outcome)
      out = 'again'
    elseif pstate == DEAD and t[2] == 'w' then
      out = 'held'
    elseif pstate ~= SUCCEEDED and t[2] ~= 'r' then
      redis.call('HSET', key .. ':p', parent, outcome)
      cancel_waiting(base, id, now)
      out = 'cancel'
    else
      redis.call('HSET', key .. ':p', parent, outcome)
      if redis.call('HINCRBY', key, 'wait', -1) > 0 then
        out = 'wait'
      else
        redis.call('ZREM', base .. 'waiting', id)
        local due = now
        local wdel = tonumber(t[3] or '-1')
        if wdel >= 0 then
          due = now + wdel
        elseif t[4] then
          due = math.max(now, tonumber(t[4]))
        end
        if due > now then
          redis.call('HSET', key, 'state', SCHEDULED, 'stime', due)
          redis.call('ZADD', KEYS[2], due, id)
          out = 'due:' .. due
        else
          to_pending(key, id, KEYS[1], now)
          woke = true
          out = 'run'
        end
      end
    end
  end
  table.insert(reply, out)
end
if woke then redis.call('PUBLISH', wake_channel, queue) end
return reply
