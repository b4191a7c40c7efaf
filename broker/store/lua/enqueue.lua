-- enqueue.lua: store a batch of new tasks of one queue (group commit of many Enqueue calls).
--
-- KEYS[1]  tb:{q}:pending     zset  id -> pending score
-- KEYS[2]  tb:{q}:scheduled   zset  id -> due time (ms)
-- KEYS[3]  tb:{q}:stats       hash  running totals
-- ARGV[1]  task key prefix tb:{q}:t:   (task hashes are derived from ids: same hash tag)
-- ARGV[2]  idempotency key prefix tb:{q}:idem:   (derived keys, same hash tag)
-- ARGV[3]  idempotency window (ms)
-- ARGV[4]  wake channel, ARGV[5] queue name (published so idle dispatchers wake at once)
-- ARGV[6]  number of tasks n; then 13 fields per task:
--          id type payload hdr pri max lease_ms bo_i bo_m delay_ms schedule_ms idem body_hash
--          (delay_ms / schedule_ms: -1 when unset; idem: '' when unset)
--
-- Returns {now, r_1 .. r_n} with r_i = 'n' (stored), 'd:<id>' (idempotency duplicate of <id>) or
-- 'e' (this id already exists: a retried call whose first reply was lost).
-- When any idempotency key is already used by a different task, nothing is written and the
-- reply is {now, 'conflict', i, ...} listing the 1-based positions in conflict.

local now = now_ms()
local prefix, idem_prefix, window = ARGV[1], ARGV[2], tonumber(ARGV[3])
local n = tonumber(ARGV[6])
local F = 13

-- Pass 1: refuse the whole batch before writing anything if a key is reused with another body.
local conflicts = {}
local seen = {}
for i = 0, n - 1 do
  local b = 7 + i * F
  local idem, body = ARGV[b + 11], ARGV[b + 12]
  if idem ~= '' then
    local known = seen[idem]
    if not known then
      local stored = redis.call('GET', idem_prefix .. idem)
      if stored then known = string.sub(stored, string.find(stored, '|', 1, true) + 1) end
    end
    if known and known ~= body then table.insert(conflicts, i + 1) end
    if not known then seen[idem] = body end
  end
end
if #conflicts > 0 then
  local reply = {now, 'conflict'}
  for _, i in ipairs(conflicts) do table.insert(reply, i) end
  return reply
end

local reply = {now}
local stored = 0
for i = 0, n - 1 do
  local b = 7 + i * F
  local id, idem = ARGV[b], ARGV[b + 11]
  local key = prefix .. id
  local dup = nil
  if idem ~= '' then
    local prior = redis.call('GET', idem_prefix .. idem)
    if prior then dup = string.sub(prior, 1, string.find(prior, '|', 1, true) - 1) end
  end
  if dup then
    table.insert(reply, 'd:' .. dup)
  elseif redis.call('EXISTS', key) == 1 then
    table.insert(reply, 'e')
  else
    local pri = tonumber(ARGV[b + 4])
    local delay, at = tonumber(ARGV[b + 9]), tonumber(ARGV[b + 10])
    local due = now
    if delay >= 0 then due = now + delay elseif at >= 0 then due = at end
    redis.call('HSET', key, 'type', ARGV[b + 1], 'payload', ARGV[b + 2], 'pri', pri,
      'att', 0, 'max', ARGV[b + 5], 'bo_i', ARGV[b + 7], 'bo_m', ARGV[b + 8], 'ctime', now)
    if ARGV[b + 3] ~= '' then redis.call('HSET', key, 'hdr', ARGV[b + 3]) end
    if ARGV[b + 6] ~= '0' then redis.call('HSET', key, 'lease_ms', ARGV[b + 6]) end
    if due > now then
      redis.call('HSET', key, 'state', SCHEDULED, 'stime', due)
      redis.call('ZADD', KEYS[2], due, id)
    else
      redis.call('HSET', key, 'state', PENDING, 'stime', now)
      redis.call('ZADD', KEYS[1], pending_score(pri, now), id)
    end
    if idem ~= '' then
      redis.call('SET', idem_prefix .. idem, id .. '|' .. ARGV[b + 12], 'PX', window)
    end
    stored = stored + 1
    table.insert(reply, 'n')
  end
end
if stored > 0 then
  redis.call('HINCRBY', KEYS[3], 'enq', stored)
  redis.call('PUBLISH', ARGV[4], ARGV[5])
end
return reply
