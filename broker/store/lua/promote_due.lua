-- promote_due.lua: move due scheduled tasks of one queue to pending (the scheduler loop keeps
-- Stats honest when no worker is leasing; lease.lua also promotes before it leases).
--
-- KEYS[1]  tb:{q}:scheduled   zset  id -> due time (ms)
-- KEYS[2]  tb:{q}:pending     zset  id -> pending score
-- ARGV     (store/argv.py PromoteArgs)
--   task_prefix   tb:{q}:t:   (derived task keys, same hash tag)
--   limit         at most this many per call
--
-- Returns {count, next_due}: next_due is the earliest remaining due time (-1 if none).

local now = now_ms()
local task_prefix, limit = unpack(ARGV, 1, 2)
local moved = promote_due(KEYS[1], KEYS[2], task_prefix, now, tonumber(limit))
return {moved, next_due(KEYS[1])}
