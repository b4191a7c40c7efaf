-- forget_queue.lua: the last step of forgetting an empty queue (the caller has already removed it
-- from the registry): if the queue is still empty, its running totals go too.
--
-- KEYS[1..6]  tb:{q}:pending scheduled leased done dead   KEYS[6] tb:{q}:meta
-- KEYS[7]     tb:{q}:stats      KEYS[8] tb:{q}:fp (priorities that have a fresh stream)
-- ARGV        (store/argv.py ForgetArgs)
--   fresh_prefix   tb:{q}:f:
--
-- A paused queue, or one with settings (limits), is kept: its meta hash is what an operator set.
-- Returns 1 when forgotten, 0 when a task arrived meanwhile or the queue is kept (the caller
-- registers it again).

for i = 1, 5 do
  if redis.call('ZCARD', KEYS[i]) > 0 then return 0 end
end
local fresh_prefix = unpack(ARGV, 1, 1)
if fresh_count(fresh_prefix, KEYS[8]) > 0 then return 0 end
if has_grouped(base_of_pending(KEYS[1])) then return 0 end
if has_workflow(base_of_pending(KEYS[1])) then return 0 end
for _, pri in ipairs(redis.call('ZRANGE', KEYS[8], 0, -1)) do
  redis.call('DEL', fresh_prefix .. pri)  -- emptied streams
end
redis.call('DEL', KEYS[8])
if has_settings(KEYS[6]) then return 0 end
redis.call('DEL', KEYS[7], KEYS[6])
return 1
