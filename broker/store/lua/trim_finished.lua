-- trim_finished.lua: delete finished tasks (succeeded, cancelled) and dead letters of one queue
-- once they are older than their retention.
--
-- KEYS[1]  tb:{q}:done        zset  id -> finish time (ms)
-- KEYS[2]  tb:{q}:dead        zset  id -> dead-letter time (ms)
-- ARGV[1]  task key prefix tb:{q}:t:   (derived task keys, same hash tag)
-- ARGV[2]  finished retention (ms), ARGV[3] dead-letter retention (ms)
-- ARGV[4]  at most this many per set per call (the caller loops while the count is full)
--
-- Returns {finished deleted, dead letters deleted}; a full count means there may be more.

local now = now_ms()
local prefix, limit = ARGV[1], tonumber(ARGV[4])
return {trim_before(KEYS[1], prefix, now - tonumber(ARGV[2]), limit),
  trim_before(KEYS[2], prefix, now - tonumber(ARGV[3]), limit)}
