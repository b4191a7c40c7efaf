-- trim_finished.lua: delete finished tasks (succeeded, cancelled) and dead letters of one queue
-- once they are older than their retention.
--
-- KEYS[1]  tb:{q}:done        zset  id -> finish time (ms)
-- KEYS[2]  tb:{q}:dead        zset  id -> dead-letter time (ms)
-- ARGV     (store/argv.py TrimArgs)
--   task_prefix   tb:{q}:t:   (derived task keys, same hash tag)
--   finished_retention_ms, dead_retention_ms
--   limit         at most this many per set per call (the caller loops while the count is full)
--
-- Returns {finished deleted, dead letters deleted}; a full count means there may be more.

local now = now_ms()
local task_prefix, finished_retention_ms, dead_retention_ms, limit = unpack(ARGV, 1, 4)
limit = tonumber(limit)
return {trim_before(KEYS[1], task_prefix, now - tonumber(finished_retention_ms), limit),
  trim_before(KEYS[2], task_prefix, now - tonumber(dead_retention_ms), limit)}
