-- release.lua: give back leases a Lease stream still held when it ended (or when its broker
-- drained). Each counts as a spent attempt, so a task that kills its workers ends in dead letters.
--
-- KEYS[1]  tb:{q}:leased      zset  id -> lease expiry (ms)
-- KEYS[2]  tb:{q}:pending     zset  id -> pending score
-- KEYS[3]  tb:{q}:dead        zset  id -> dead-letter time (ms)
-- KEYS[4]  tb:{q}:stats       hash  running totals
-- ARGV[1]  task key prefix tb:{q}:t:   (derived task keys, same hash tag)
-- ARGV[2]  wake channel, ARGV[3] queue name, ARGV[4] reason recorded as the attempt's error
-- ARGV[5]  n; then 2 fields per lease: id lease_id
--
-- Leases that are no longer current (already settled, reclaimed or re-leased) are skipped.
-- Returns the number of leases released.

local now = now_ms()
local prefix, n = ARGV[1], tonumber(ARGV[5])
local keys = {leased = KEYS[1], pending = KEYS[2], dead = KEYS[3], stats = KEYS[4]}
local released = 0
for i = 0, n - 1 do
  local id, lease_id = ARGV[6 + i * 2], ARGV[7 + i * 2]
  local key = prefix .. id
  local t = redis.call('HMGET', key, 'state', 'lid')
  if t[1] and tonumber(t[1]) == LEASED and t[2] == lease_id then
    end_lease(key, id, keys, now, ARGV[4])
    released = released + 1
  end
end
if released > 0 then redis.call('PUBLISH', ARGV[2], ARGV[3]) end
return released
