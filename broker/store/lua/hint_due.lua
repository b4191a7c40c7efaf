-- hint_due.lua: tell the due index that queues may have something due by a time (a HINT, sent
-- right after the state change that created the due time; see store/due_index.py).
--
-- KEYS[1]  tb:{~dueN}:at      zset  queue -> when to look next (ms, Redis time)
-- KEYS[2]  tb:{~dueN}:gen     hash  queue -> generation, bumped by every hint
-- ARGV     (store/argv.py HintArgs, HintItem)
--   n; then n items: queue, at_ms (absolute time, -1: none), delay_ms (from now, -1: none).
--          The entry's score becomes the earliest of both, and only ever moves
--          earlier (ZADD LT): a hint never hides an earlier due time.
--
-- The generation bump makes a maintainer's raise of the entry (settle_due.lua) fail when a hint
-- arrived after the maintainer read the queue, so the raise cannot hide this due time either.
-- Returns n.

local now = now_ms()
local n = unpack(ARGV, 1, 1)
n = tonumber(n)
for i = 0, n - 1 do
  local queue, at_ms, delay_ms = item(1, 3, i)
  local at, delay = tonumber(at_ms), tonumber(delay_ms)
  local score = at
  if delay >= 0 and (score < 0 or now + delay < score) then score = now + delay end
  if score >= 0 then
    redis.call('ZADD', KEYS[1], 'LT', score, queue)
    redis.call('HINCRBY', KEYS[2], queue, 1)
  end
end
return n
