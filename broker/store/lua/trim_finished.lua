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
local function trim(set_key, retention_ms)
  local old = redis.call('ZRANGE', set_key, '-inf', now - retention_ms, 'BYSCORE', 'LIMIT', 0, limit)
  for _, id in ipairs(old) do
    redis.call('ZREM', set_key, id)
    redis.call('DEL', prefix .. id)
  end
  return #old
end
return {trim(KEYS[1], tonumber(ARGV[2])), trim(KEYS[2], tonumber(ARGV[3]))}
