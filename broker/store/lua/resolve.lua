-- resolve.lua: tell children of one queue how their parents ended (the outbox mover runs it in
-- the children's slot; docs/data-model.md#workflows-dependencies-across-slots). Idempotent:
-- each child records each parent's end once, so an outbox entry moved twice (a mover that
-- died, two replicas) changes nothing.
--
-- KEYS[1]  tb:{c}:pending     zset
-- KEYS[2]  tb:{c}:scheduled   zset
-- ARGV     (store/argv.py ResolveArgs, ResolveItem)
--   task_prefix   tb:{c}:t:   (the children's keys, same hash tag)
--   wake_channel, queue   published to when a child becomes pending
--   n; then n items: id (a child's local id), parent (the parent's task id), state (how the
--   parent ended: SUCCEEDED, DEAD or CANCELLED; a parent gone counts as CANCELLED),
--   parent_type, result ('' unless SUCCEEDED)
--
-- A child's policy (fpol) says what a failed parent does: c cancels it, r counts the parent as
-- ended, w keeps it waiting on a DEAD parent (a redrive may still succeed) and cancels it on a
-- CANCELLED one. A child whose last awaited parent is recorded is released: pending, or
-- scheduled when it has a delay (counted from now) or a later schedule time. The record is the
-- state digit, the parent's type, a space and its result.
-- Returns {now, r_1 .. r_n}: 'nf' (no such child of this parent), 'again' (recorded already, or
-- the child ended), 'wait' (recorded; other parents awaited), 'held' (a DEAD parent the child
-- waits to see redriven), 'run' (released: pending), 'due:<ms>' (released: scheduled) or
-- 'cancel' (cancelled; its own children hear through its queue's outbox).

local now = now_ms()
local task_prefix, wake_channel, queue, n = unpack(ARGV, 1, 4)
local base = base_of_tasks(task_prefix)
local reply = {now}
local woke = false
for i = 0, tonumber(n) - 1 do
  local id, parent, state, parent_type, result = item(4, 5, i)
  local pstate = tonumber(state)
  local outcome = state .. parent_type .. ' '
  if pstate == SUCCEEDED then outcome = outcome .. result end
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
