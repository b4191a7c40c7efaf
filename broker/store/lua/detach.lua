-- detach.lua: leases whose Lease stream ended (it broke, or its broker stopped) wait a short
-- resume window for the worker to present them on a new stream (resume.lua), then the reaper
-- ends them as spent attempts with the recorded reason.
--
-- KEYS[1]  tb:{q}:leased      zset  id -> lease expiry (ms)
-- ARGV     (store/argv.py DetachArgs, HeldItem)
--   task_prefix   tb:{q}:t:   (derived task keys, same hash tag)
--   stream_id     the ended stream's id: only leases this stream still holds are detached, so a
--                 lease that another stream (on any replica) has already resumed is left alone
--   window_ms     resume window: the lease expires at the earlier of its expiry and now + window
--   reason        recorded as the attempt's error if the lease is not resumed
--   n; then n items: id lease_id
--
-- Returns {count detached, earliest new expiry ms or -1}.

local now = now_ms()
local task_prefix, stream_id, window_ms, reason, n = unpack(ARGV, 1, 5)
local window = tonumber(window_ms)
n = tonumber(n)
local detached, earliest = 0, -1
for i = 0, n - 1 do
  local id, lease_id = item(5, 2, i)
  local key = task_prefix .. id
  local t = redis.call('HMGET', key, 'state', 'lid', 'sid', 'etime')
  if t[1] and tonumber(t[1]) == LEASED and t[2] == lease_id and t[3] == stream_id then
    local expire = math.min(tonumber(t[4]), now + window)
    redis.call('HSET', key, 'sid', '', 'etime', expire, 'ereason', reason)
    redis.call('ZADD', KEYS[1], expire, id)
    detached = detached + 1
    if earliest < 0 or expire < earliest then earliest = expire end
  end
end
return {detached, earliest}
