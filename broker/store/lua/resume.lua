-- resume.lua: move leases a worker still holds onto its new Lease stream (after its old stream
-- broke, or its broker drained). A lease is resumed only while it is current: same lease id,
-- still LEASED. The lease id and attempt stay; the expiry moves to now + the lease's length.
--
-- KEYS[1]  tb:{q}:leased      zset  id -> lease expiry (ms)
-- ARGV     (store/argv.py ResumeArgs, HeldItem)
--   task_prefix   tb:{q}:t:   (derived task keys, same hash tag)
--   stream_id     the new stream's id (becomes the lease's `sid`)
--   holder        the principal resuming ('' without a policy): a lease bound to another is
--                 refused
--   n; then n items: id lease_id
--
-- Returns {now, r_1 .. r_n}; r_i = {'ok', new_expiry_ms} or {'stale'}, {'foreign'} (current, but
-- another principal's) or {'nf'}.

local now = now_ms()
local task_prefix, stream_id, holder, n = unpack(ARGV, 1, 4)
n = tonumber(n)
local reply = {now}
for i = 0, n - 1 do
  local id, lease_id = item(4, 2, i)
  local key = task_prefix .. id
  local t = redis.call('HMGET', key, 'state', 'lid', 'cur_ms', 'lp')
  if not t[1] then
    table.insert(reply, {'nf'})
  elseif tonumber(t[1]) == LEASED and t[2] == lease_id and foreign(t[4], holder) then
    table.insert(reply, {'foreign'})
  elseif tonumber(t[1]) == LEASED and t[2] == lease_id then
    local expire = now + tonumber(t[3])
    redis.call('HSET', key, 'sid', stream_id, 'etime', expire)
    redis.call('HDEL', key, 'ereason')
    redis.call('ZADD', KEYS[1], expire, id)
    table.insert(reply, {'ok', expire})
  else
    table.insert(reply, {'stale'})
  end
end
return reply
