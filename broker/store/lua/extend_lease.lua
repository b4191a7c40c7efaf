-- extend_lease.lua: push out the expiry of leases of one queue, each only if it is current.
--
-- KEYS[1]  tb:{q}:leased      zset  id -> lease expiry (ms)
-- ARGV     (store/argv.py ExtendArgs, ExtendItem)
--   task_prefix   tb:{q}:t:   (derived task keys, same hash tag)
--   n; then n items: id lease_id duration_ms holder (duration_ms -1: the lease length the task
--   was delivered with; holder: the presenting principal, '' without a policy; a current lease
--   bound to another is refused)
--
-- Like ack.lua, a lease past its deadline that no replica has reclaimed yet may still be extended.
-- Returns {now, r_1 .. r_n}; r_i = {'ok', new_expiry_ms} or {'stale'}, {'foreign'} (current, but
-- another principal's) or {'nf'}.

local now = now_ms()
local task_prefix, n = unpack(ARGV, 1, 2)
n = tonumber(n)
local reply = {now}
for i = 0, n - 1 do
  local id, lease_id, duration_ms, holder = item(2, 4, i)
  local ms = tonumber(duration_ms)
  local key = task_prefix .. id
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
