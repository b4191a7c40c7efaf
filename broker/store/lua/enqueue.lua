-- enqueue.lua: store a batch of new tasks of one queue (group commit of many Enqueue calls).
--
-- KEYS[1]  tb:{q}:pending     zset  id -> pending score
-- KEYS[2]  tb:{q}:scheduled   zset  id -> due time (ms)
-- KEYS[3]  tb:{q}:stats       hash  running totals
-- KEYS[4]  tb:{q}:fp          zset  priorities that have a fresh stream, scored -priority
-- KEYS[5]  tb:{q}:meta        hash  queue settings (enqueue_rate_limit: store/queue_meta.py)
-- ARGV     (store/argv.py EnqueueArgs, EnqueueItem)
--   task_prefix             tb:{q}:t:   (task hashes are derived from ids: same hash tag)
--   fresh_prefix            tb:{q}:f:   (a stream of fresh pending tasks per priority)
--   idempotency_prefix      tb:{q}:idem:   (derived keys, same hash tag)
--   stage_prefix            tb:{q}:stage:  (large payloads written ahead: RedisStore.enqueue)
--   idempotency_window_ms
--   wake_channel, queue     published to so idle dispatchers wake at once
--   staged                  1-based positions ("2,5") of the tasks whose payload is not in ARGV
--                           but in the hash stage_prefix .. id, renamed into place here, so a
--                           large payload is never copied by a script ('' for none)
--   calls                   how many tasks each Enqueue call of the batch holds, in order
--                           ("3,1,1"; '': one call), which enqueue_rate_limit admits whole
--   n
--   echo_channel            '' or the caller's own channel, published to (the queue's name)
--                           just before the wake: the caller leases in the same write, so
--                           its own wake listener lets the wake right after the echo pass
--   then n tasks: id entry_id task_type payload headers priority max_attempts lease_ms
--   initial_backoff_ms max_backoff_ms delay_ms schedule_ms idempotency_key body_hash group_key
--   parents parent_policy
--   (delay_ms / schedule_ms: -1 when unset; idempotency_key, group_key: '' when unset; parents:
--   the ids of the tasks it depends on, space-separated, '' for none; parent_policy c, r or w)
--
-- A task ready now whose payload came in ARGV is stored fresh: one entry of its priority's
-- stream, under entry_id (derived from its id, so ids from one broker arrive in stream order),
-- with no key of its own. Any other (delayed, staged, with a group key, or out of its stream's
-- order: another replica's ids) gets its hash and an entry in the pending (its key's: prelude's
-- add_pending) or scheduled zset; one with parents is WAITING (prelude's store_task_hash) and
-- its queue's outbox mover is told.
--
-- Returns {now, r_1 .. r_n} with r_i = 'n' (stored), 'd:<id>' (idempotency duplicate of <id>),
-- 'e' (this id already exists: a retried call whose first reply was lost) or 'l:<ms>' (not
-- stored: its call is over the enqueue_rate_limit and would fit in <ms>; -1: never, the call
-- holds more tasks than the burst).
-- When any idempotency key is already used by a different task, nothing is written and the
-- reply is {now, 'conflict', i, ...} listing the 1-based positions in conflict; else when a
-- staged payload is gone (it expired, or Redis lost it), nothing is written and the reply is
-- {now, 'lost', i, ...}.

local now = now_ms()
local task_prefix, fresh_prefix, idempotency_prefix, stage_prefix, idempotency_window_ms,
  wake_channel, queue, staged, calls, n, echo_channel = unpack(ARGV, 1, 11)
n = tonumber(n)
local is_staged = {}
for position in string.gmatch(staged, '%d+') do is_staged[tonumber(position)] = true end

-- Pass 1: refuse the whole batch before writing anything if a key is reused with another body.
local conflicts, lost = {}, {}
local seen = {}
for i = 0, n - 1 do
  local id, entry_id, task_type, payload, headers, priority, max_attempts, lease_ms,
    initial_backoff_ms, max_backoff_ms, delay_ms, schedule_ms, idempotency_key,
    body_hash, group_key, parents, parent_policy = item(11, 17, i)
  local idem, body = idempotency_key, body_hash
  if is_staged[i + 1] and redis.call('EXISTS', stage_prefix .. id) == 0
    and redis.call('EXISTS', task_prefix .. id) == 0 then
    table.insert(lost, i + 1)
  end
  if idem ~= '' then
    local known = seen[idem]
    if not known then
      local stored = redis.call('GET', idempotency_prefix .. idem)
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
if #lost > 0 then
  local reply = {now, 'lost'}
  for _, i in ipairs(lost) do table.insert(reply, i) end
  return reply
end

-- enqueue_rate_limit: each task takes a token; calls are admitted whole, in order.
local refused = {}  -- 1-based position -> its reply ('l:<ms>')
local limit = redis.call('HMGET', KEYS[5], 'erl_rate', 'erl_burst', 'erl_tok', 'erl_at')
local tokens, rate = bucket_tokens(limit[1], limit[2], limit[3], limit[4], now)
if tokens then
  local sizes = {}
  for size in string.gmatch(calls, '%d+') do table.insert(sizes, tonumber(size)) end
  if #sizes == 0 then sizes = {n} end
  local first = 1
  for _, size in ipairs(sizes) do
    if size <= tokens then
      tokens = tokens - size
    else
      local verdict = 'l:-1'
      if size <= tonumber(limit[2]) then verdict = 'l:' .. bucket_wait_ms(tokens, rate, size) end
      for position = first, first + size - 1 do refused[position] = verdict end
    end
    first = first + size
  end
  redis.call('HSET', KEYS[5], 'erl_tok', tostring(tokens), 'erl_at', now)
end

local indexed = {}  -- priorities put in the fresh index by this call

-- Stores a fresh task as an entry of its priority's stream: 'n' when stored, 'e' when the entry
-- is there already (a retried call), nil when the entry cannot go there (out of the stream's
-- order): the caller stores a hash instead.
-- The priority comes as its text too: the stream's name and its index member use it as it is
-- (making a number text again costs a sprintf per task).
local function store_fresh(id, entry_id, pri, pri_text, task_type, payload, headers,
    max_attempts, lease_ms, initial_backoff_ms, max_backoff_ms)
  local stream = fresh_prefix .. pri_text
  local added = redis.pcall('XADD', stream, entry_id, 'id', id, 'type', task_type,
    'payload', payload, 'hdr', headers, 'max', max_attempts, 'lease_ms', lease_ms,
    'bo_i', initial_backoff_ms, 'bo_m', max_backoff_ms)
  if type(added) == 'table' and added.err then
    if #redis.call('XRANGE', stream, entry_id, entry_id) > 0 then return 'e' end
    return nil
  end
  if not indexed[pri_text] then  -- once per priority and call
    redis.call('ZADD', KEYS[4], -pri, pri_text)
    indexed[pri_text] = true
  end
  return 'n'
end

local reply = {now}
local stored, waiting = 0, 0
for i = 0, n - 1 do
  local id, entry_id, task_type, payload, headers, priority, max_attempts, lease_ms,
    initial_backoff_ms, max_backoff_ms, delay_ms, schedule_ms, idempotency_key,
    body_hash, group_key, parents, parent_policy = item(11, 17, i)
  local idem = idempotency_key
  local key = task_prefix .. id
  local dup = nil
  if idem ~= '' then
    local prior = redis.call('GET', idempotency_prefix .. idem)
    if prior then dup = string.sub(prior, 1, string.find(prior, '|', 1, true) - 1) end
  end
  local pri = tonumber(priority)
  local delay, at = tonumber(delay_ms), tonumber(schedule_ms)
  local due = now
  if delay >= 0 then due = now + delay elseif at >= 0 then due = at end
  local outcome = nil
  if refused[i + 1] then
    if is_staged[i + 1] then redis.call('DEL', stage_prefix .. id) end
    table.insert(reply, refused[i + 1])
  elseif dup then
    if is_staged[i + 1] then redis.call('DEL', stage_prefix .. id) end
    table.insert(reply, 'd:' .. dup)
  elseif redis.call('EXISTS', key) == 1 then
    if is_staged[i + 1] then redis.call('DEL', stage_prefix .. id) end
    table.insert(reply, 'e')
  else
    if not is_staged[i + 1] and due <= now and group_key == '' and parents == '' then
      outcome = store_fresh(id, entry_id, pri, priority, task_type, payload, headers,
        max_attempts, lease_ms, initial_backoff_ms, max_backoff_ms)
    end
    if outcome == nil then
      if is_staged[i + 1] then  -- the payload is in place already: only its expiry goes
        redis.call('RENAME', stage_prefix .. id, key)
        redis.call('PERSIST', key)
        payload = nil
      end
      local t = {type = task_type, payload = payload, pri = pri,
        max = max_attempts, bo_i = initial_backoff_ms, bo_m = max_backoff_ms, hdr = headers,
        lease_ms = lease_ms, gk = group_key}
      if parents ~= '' then
        t.parents, t.fpol, t.wdel = {}, parent_policy, delay
        for parent in string.gmatch(parents, '%S+') do table.insert(t.parents, parent) end
        if at >= 0 then t.wat = at end
        waiting = waiting + 1
      end
      store_task_hash(key, id, t, now, due, KEYS[1], KEYS[2])
      outcome = 'n'
    end
    if outcome == 'n' then
      if idem ~= '' then
        redis.call('SET', idempotency_prefix .. idem, id .. '|' .. body_hash, 'PX',
          idempotency_window_ms)
      end
      stored = stored + 1
    end
    table.insert(reply, outcome)
  end
end
if stored > 0 then
  redis.call('HINCRBY', KEYS[3], 'enq', stored)
  if echo_channel ~= '' then redis.call('PUBLISH', echo_channel, queue) end
  redis.call('PUBLISH', wake_channel, queue)
end
if waiting > 0 then redis.call('PUBLISH', FLOW_CHANNEL, queue) end
return reply
