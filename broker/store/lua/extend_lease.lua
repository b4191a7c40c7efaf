-- extend_lease.lua: push out the expiry of leases of one queue, each only if it is current.
--
-- KEYS[1]  tb:{q}:leased      zset  id -> lease expiry (ms)
-- ARGV[1]  task key prefix tb:{q}:t:   (derived task keys, same hash tag)
-- ARGV[2]  n; then 4 fields per extension: id lease_id duration_ms holder
--          (duration_ms -1: the lease length the task was delivered with; holder: the presenting
--          principal, '' without a policy; a current lease bound to another is refused)
--
-- Like ack.lua, a lease past its deadline that no replica has reclaimed yet may still be extended.
-- Returns {now, r_1 .. r_n}; r_i = {'ok', new_expiry_ms} or {'stale'}, {'foreign'} (current, but
-- another principal's) or {'nf'}.

local now = now_ms()
local prefix, n = ARGV[1], tonumber(ARGV[2])
local reply = {now}
for i = 0, n - 1 do
  local b = 3 + i * 4
  local id, lease_id, ms, holder = ARGV[b], ARGV[b + 1], tonumber(ARGV[b + 2]), ARGV[b + 3]
  local key = prefix .. id
  local t = redis.call('HMGET', key, 'state', 'lid', 'cur_ms', 'lp')
  if not t[1] then
    table.insert(reply, {'nf'})
  elseif tonumber(t[1]) == LEASED and t[2] == lease_id and foreign(t[4], holder) then
    table.insert(reply, {'foreign'})
  elseif tonumber(t[1]) == LEASED and t[2] == lease_id then
    if ms < 0 then ms = tonumber(t[3]) end
    local expire = now + ms
    redis.call('HSET', key, 'etime', expire)
    redis.call('ZADD', KEYS[1], expire, id)
    table.insert(reply, {'ok', expire})
  else
    table.insert(reply, {'stale'})
  end
end
return reply
