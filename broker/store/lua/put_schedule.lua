-- put_schedule.lua: create or change a schedule's hash, refusing a create of one that exists
-- and a change of one that does not, so nothing is stored on a refusal.
--
-- KEYS[1]  tb:{q}:sched:<name>  hash  the schedule (store/schedule_store.py names its fields)
-- ARGV     (store/argv.py PutScheduleArgs)
--   mode     'create' or 'update'
--   drop     a field to delete ('' for none: 'next' when pausing)
--   n; then n field/value pairs to set
--
-- Returns {'ok', now}, or {'exists', now} / {'missing', now} when refused.

local now = now_ms()
local mode, drop, n = unpack(ARGV, 1, 3)
local s = KEYS[1]
local exists = redis.call('EXISTS', s) == 1
if mode == 'create' and exists then return {'exists', now} end
if mode ~= 'create' and not exists then return {'missing', now} end
if mode == 'create' then redis.call('HSET', s, 'ctime', now) end
redis.call('HSET', s, 'utime', now)
for i = 0, tonumber(n) - 1 do
  local name, value = item(3, 2, i)
  redis.call('HSET', s, name, value)
end
if drop ~= '' then redis.call('HDEL', s, drop) end
return {'ok', now}
