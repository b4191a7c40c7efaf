-- take_due.lua: the queues of one due-index shard whose time to look has come, claimed briefly
-- so that broker replicas share the work instead of repeating it.
--
-- KEYS[1]  tb:{~dueN}:at      zset  queue -> when to look next (ms, Redis time)
-- KEYS[2]  tb:{~dueN}:gen     hash  queue -> generation (bumped by every hint)
-- ARGV     (store/argv.py TakeDueArgs)
--   limit      at most this many queues
--   claim_ms   a taken entry is moved to now + claim, so a maintainer that dies mid-pass
--          delays the queue by at most this (a hint still lowers it; settle_due.lua sets it)
--
-- Returns {now, queue_1, gen_1, queue_2, gen_2, ...} (gen '' when the queue has none).

local now = now_ms()
local limit, claim_ms = unpack(ARGV, 1, 2)
local due = redis.call('ZRANGE', KEYS[1], '-inf', now, 'BYSCORE', 'LIMIT', 0, tonumber(limit))
local reply = {now}
for _, queue in ipairs(due) do
  redis.call('ZADD', KEYS[1], 'XX', now + tonumber(claim_ms), queue)
  table.insert(reply, queue)
  table.insert(reply, redis.call('HGET', KEYS[2], queue) or '')
end
return reply
