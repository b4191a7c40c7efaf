-- stats.lua: read one queue's counts, totals and the age of its oldest pending task.
--
-- KEYS[1]  tb:{q}:pending   KEYS[2] tb:{q}:scheduled   KEYS[3] tb:{q}:leased
-- KEYS[4]  tb:{q}:dead      KEYS[5] tb:{q}:stats       KEYS[6] tb:{q}:meta
-- KEYS[7]  tb:{q}:fp (priorities that have a fresh stream)
-- ARGV     (store/argv.py StatsArgs)
--   fresh_prefix   tb:{q}:f:
--
-- Pending counts the pending zset, the fresh streams (enqueue.lua) and the tasks waiting under
-- group keys together; for the keys, over at most 1,000 of each kind (rotation, parked,
-- waiting for a token), and their age is that of each key's next task.
--
-- The oldest pending task is the minimum ready time over the priority bands in use: one
-- ZRANGE per band, at most 64 bands (beyond that the age is a lower bound).
-- Returns {now, pending, scheduled, leased, dead, meta (HGETALL: paused, limits),
-- oldest_ready_ms (-1), stats (HGETALL), group keys with pending tasks (in the rotation, parked
-- or waiting for a token: a key may be in two for a moment), of those parked, waiting (WAITING
-- for parents)}.

local now = now_ms()
local oldest = -1
local from = '-inf'
for _ = 1, 64 do
  local first = redis.call('ZRANGE', KEYS[1], from, '+inf', 'BYSCORE', 'LIMIT', 0, 1, 'WITHSCORES')
  if #first == 0 then break end
  local score = tonumber(first[2])
  local band = math.floor(score / BAND)
  local ready = score - band * BAND
  if oldest < 0 or ready < oldest then oldest = ready end
  from = tostring((band + 1) * BAND)
end
local fresh_prefix = unpack(ARGV, 1, 1)
local fresh, fresh_oldest = fresh_count(fresh_prefix, KEYS[7])
if fresh_oldest >= 0 and (oldest < 0 or fresh_oldest < oldest) then oldest = fresh_oldest end
local grouped, grouped_oldest = grouped_count(base_of_pending(KEYS[1]), 1000)
if grouped_oldest >= 0 and (oldest < 0 or grouped_oldest < oldest) then oldest = grouped_oldest end
local base = base_of_pending(KEYS[1])
local parked_keys = redis.call('SCARD', base .. 'gp')
local pending_keys = redis.call('ZCARD', base .. 'gk') + parked_keys + redis.call('ZCARD', base .. 'gw')
return {now, redis.call('ZCARD', KEYS[1]) + fresh + grouped, redis.call('ZCARD', KEYS[2]),
  redis.call('ZCARD', KEYS[3]), redis.call('ZCARD', KEYS[4]), redis.call('HGETALL', KEYS[6]), oldest,
  redis.call('HGETALL', KEYS[5]), pending_keys, parked_keys, redis.call('ZCARD', base .. 'waiting')}
