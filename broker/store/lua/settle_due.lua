-- settle_due.lua: after maintaining queues, set each index entry to the queue's real next due
-- time, but only if no hint arrived since the entry was taken (compare-and-set on generation).
--
-- KEYS[1]  tb:{~dueN}:at      zset  queue -> when to look next (ms, Redis time)
-- KEYS[2]  tb:{~dueN}:gen     hash  queue -> generation (bumped by every hint)
-- ARGV     (store/argv.py SettleDueArgs, SettleDueItem)
--   n; then n items: queue, gen (the generation read by take_due.lua, '' for none),
--   next_due_ms (-1: nothing due: the entry is removed)
--
-- A queue whose generation moved keeps its entry: the hint already lowered it, or the claim
-- brings it back within the claim time, and the next pass looks again.
-- Returns how many entries were set or removed.

local n = unpack(ARGV, 1, 1)
n = tonumber(n)
local done = 0
for i = 0, n - 1 do
  local queue, gen, next_due_ms = item(1, 3, i)
  local at = tonumber(next_due_ms)
  if (redis.call('HGET', KEYS[2], queue) or '') == gen then
    if at < 0 then
      redis.call('ZREM', KEYS[1], queue)
    else
      redis.call('ZADD', KEYS[1], at, queue)
    end
    done = done + 1
  end
end
return done
