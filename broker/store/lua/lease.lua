-- lease.lua: lease up to n tasks of one queue, highest priority first, FIFO within a priority.
-- Due scheduled tasks are promoted first, so a delayed task needs no separate pass to run on time.
--
-- KEYS[1]  tb:{q}:pending     zset  id -> pending score
-- KEYS[2]  tb:{q}:scheduled   zset  id -> due time (ms)
-- KEYS[3]  tb:{q}:leased      zset  id -> lease expiry (ms)
-- KEYS[4]  tb:{q}:meta        hash  queue settings (paused, limits: store/queue_meta.py)
-- KEYS[5]  tb:{q}:fp          zset  priorities that have a fresh stream, scored -priority
-- ARGV     (store/argv.py LeaseArgs, LeaseSlot)
--   task_prefix   tb:{q}:t:   (task hashes are derived from popped ids: same hash tag)
--   fresh_prefix  tb:{q}:f:   (fresh pending tasks, a stream per priority: enqueue.lua)
--   reply_bytes   no further task is leased once the reply holds this many bytes of task
--                 fields (the first always is): Redis copies a reply's bytes twice, and other
--                 clients wait meanwhile, so megabyte tasks go a few per call
--   fetch_bytes   a task from the pending zset whose payload is larger (`psz`, written with
--                 a staged payload) is answered without it, for the caller to read with a
--                 plain HGET: Redis took about 1.7 ms to pass a 1 MiB payload through Lua
--                 into a reply, and 0.07 ms to HGET it
--   n; then n slots: lease_id (fresh, random), lease_ms (for a task without its own),
--   stream_id (the Lease stream the slot belongs to, stored as `sid`: the stream that holds
--   the lease) and holder (the principal the lease is bound to, stored as `lp`; '' without a
--   policy). Slots are filled in order, so the caller knows which stream each leased task
--   belongs to. Then the names of the task fields to return.
--
-- Pending tasks are in two places: fresh ones in their priority's stream, the others (retried,
-- promoted, redriven, or stored out of stream order) in the pending zset. Both are read in
-- pending-score order (priority, then ready time) and merged, a fresh task getting its hash as
-- it is leased.
--
-- Limits: at most max_concurrency (`mc`) leased at once, and a lease takes a token of the
-- rate_limit's bucket. Tasks held back by the rate make next_due the time the next token is
-- due, so the dispatcher sleeps until then; held back by the cap, the queue is marked
-- `blocked` and the script that frees a slot wakes it (wake_if_blocked).
--
-- Returns {now, next_due, paused, id_1, fields_1, id_2, fields_2, ...}: next_due is the earliest
-- scheduled time or next token (-1 when none; now when reply_bytes held tasks back), paused is
-- 1 when nothing was leased because the queue is paused, 2 when the rate limit held tasks back
-- until next_due, fields_i is the leased task's values of the named fields, in order (HMGET),
-- plus, for a payload left out (fetch_bytes), its length after them;
-- or, for a task leased straight from its fresh stream, the short form: type, payload, hdr,
-- pri, max, ctime, etime, lease_ms, bo_i, bo_m, lid (store/redis_store.py FRESH_REPLY_FIELDS).

local now = now_ms()
local task_prefix, fresh_prefix, reply_bytes, fetch_bytes, n = unpack(ARGV, 1, 5)
n = tonumber(n)
reply_bytes = tonumber(reply_bytes)
fetch_bytes = tonumber(fetch_bytes)
local fields = {unpack(ARGV, 5 + 4 * n + 1)}
-- The same names with the payload's replaced by '' (no task field has that name: HMGET
-- answers nil for it), for a task whose payload the caller reads itself; built when first
-- needed, since most calls lease no such task.
local fields_but_payload = nil
local function without_payload()
  if not fields_but_payload then
    fields_but_payload = {}
    for i, name in ipairs(fields) do
      if name == 'payload' then fields_but_payload[i] = '' else fields_but_payload[i] = name end
    end
  end
  return fields_but_payload
end
local meta = redis.call('HMGET', KEYS[4], 'paused', 'mc', 'rl_rate', 'rl_burst', 'rl_tok',
  'rl_at', 'blocked', 'pk_mc', 'turn', 'dturn', 'pk_rate', 'pk_burst', 'aging')
if meta[1] == '1' then
  return {now, next_due(KEYS[2]), 1}
end
-- Bounded so one call stays short even when a backlog of delayed tasks comes due at once.
promote_due(KEYS[2], KEYS[1], task_prefix, now, 1000)

-- How many the limits allow now (`allowed`), and how many candidates to read: one more than
-- allowed when a limit binds, to learn whether it held any task back.
local allowed = n
local cap = tonumber(meta[2] or '0')
local cap_left = n
if cap > 0 then
  cap_left = math.max(0, cap - redis.call('ZCARD', KEYS[3]))
  allowed = math.min(allowed, cap_left)
end
local tokens, rate = bucket_tokens(meta[3], meta[4], meta[5], meta[6], now)
if tokens then allowed = math.min(allowed, math.floor(tokens)) end
local look = n
if allowed < n then look = allowed + 1 end

-- priority_aging: a waiting task gains a priority point per `aging` ms of waiting, so tasks go
-- in order of ready time minus priority * aging (lowest first). That order does not change as
-- time passes, so it is computed once per candidate. 0: strict priority (the pending score).
local aging = tonumber(meta[13] or '0')
local function order_of(score)
  if aging == 0 then return score end
  local band = math.floor(score / BAND)
  return (score - band * BAND) - (1000 - band) * aging
end
-- Up to `count` tasks of each priority band of a pending zset, in aging order: {id, order}.
local function by_band(zkey, count)
  local out = {}
  local from = '-inf'
  for _ = 1, 64 do
    local got = redis.call('ZRANGE', zkey, from, '+inf', 'BYSCORE', 'LIMIT', 0, count,
      'WITHSCORES')
    if #got == 0 then break end
    local band = math.floor(tonumber(got[2]) / BAND)
    for i = 1, #got, 2 do
      local score = tonumber(got[i + 1])
      if math.floor(score / BAND) ~= band then break end
      table.insert(out, {got[i], order_of(score)})
    end
    from = string.format('%.0f', (band + 1) * BAND)
  end
  table.sort(out, function(a, b) return a[2] < b[2] end)
  return out
end

-- Up to `look` candidates from each place, in order: {id, order} from the pending zset.
local held = {}
if aging == 0 then
  local flat = redis.call('ZRANGE', KEYS[1], 0, look - 1, 'WITHSCORES')
  for i = 1, #flat, 2 do table.insert(held, {flat[i], tonumber(flat[i + 1])}) end
else
  held = by_band(KEYS[1], look)
end
local fresh = {}    -- candidates: {order, stream index, position, priority, fields, created ms}
                    -- (priority and created as text, as they are stored)
local streams = {}  -- per stream read: {key, priority, entry ids read, the id after them}
for _, pri in ipairs(redis.call('ZRANGE', KEYS[5], 0, -1)) do
  -- Strict priority reads the highest priorities first; with aging, any may go first.
  if aging == 0 and #fresh >= look then break end
  local stream = fresh_prefix .. pri
  local want = look - #fresh
  if aging > 0 then want = look end
  -- One more than wanted: the first entry left, below which the taken ones are trimmed.
  local entries = redis.call('XRANGE', stream, '-', '+', 'COUNT', want + 1)
  if #entries == 0 then drop_if_empty(stream, KEYS[5], pri) end
  local read = {stream, tonumber(pri), {}, false}
  table.insert(streams, read)
  local ids, index, priority = read[3], #streams, read[2]
  for i, e in ipairs(entries) do
    if i > want then
      read[4] = e[1]
    else
      local entry_id = e[1]
      ids[i] = entry_id
      local created = string.sub(entry_id, 1, string.find(entry_id, '-', 1, true) - 1)
      local order = pending_score(priority, tonumber(created))
      if aging > 0 then order = order_of(order) end
      fresh[#fresh + 1] = {order, index, i, pri, e[2], created}
    end
  end
end
if aging > 0 then  -- the same order within a stream as read: its taken entries stay a prefix
  table.sort(fresh, function(a, b)
    if a[1] ~= b[1] then return a[1] < b[1] end
    if a[2] ~= b[2] then return a[2] < b[2] end
    return a[3] < b[3]
  end)
end

local reply = {now, next_due(KEYS[2]), 0}
local used = 0
local returned = 0  -- bytes of task fields in the reply
local leases = {}  -- expiry-id pairs for one ZADD to the leased set (bulk_call)
local function room() return used < allowed and returned < reply_bytes end
local function add_to_reply(id, values)
  for _, v in ipairs(values) do
    if v then returned = returned + #v end
  end
  table.insert(reply, id)
  table.insert(reply, values)
end
local function lease(key, id)
  used = used + 1
  local lease_id, lease_ms, stream_id, holder = item(5, 4, used - 1)
  local ms = tonumber(lease_ms)
  local own = tonumber(redis.call('HGET', key, 'lease_ms') or '0')
  if own > 0 then ms = own end
  local expire = now + ms
  redis.call('HINCRBY', key, 'att', 1)
  redis.call('HSET', key, 'state', LEASED, 'lid', lease_id, 'etime', expire, 'cur_ms', ms,
    'sid', stream_id)
  bind_lease(key, holder)
  leases[#leases + 1] = expire
  leases[#leases + 1] = id
  -- psz: the payload's size, written with a staged payload (HSTRLEN would need one more
  -- command in the broker's documented Redis ACL).
  local size = tonumber(redis.call('HGET', key, 'psz') or '0')
  if size > fetch_bytes then
    local values = redis.call('HMGET', key, unpack(without_payload()))
    values[#fields + 1] = tostring(size)
    returned = returned + size
    add_to_reply(id, values)
  else
    add_to_reply(id, redis.call('HMGET', key, unpack(fields)))
  end
end

-- A fresh task's hash, written once with its lease (the hot path: one HSET, no reads). Its
-- fields come from the stream entry as enqueue.lua writes them (store_fresh's order), read by
-- position; an entry in another order is read by name.
local LEASED_TEXT = tostring(LEASED)
-- Numbers are formatted with sprintf wherever Lua makes them text (tostring, .., redis.call's
-- arguments): the texts a fresh lease stores come as text, and each expiry is made once.
local expiry_of = {}  -- lease length (ms, text) -> expiry (ms, text)
local function lease_fresh(pri, created, flat)
  local id, task_type, payload, hdr, max, own_ms, bo_i, bo_m
  if #flat == 16 and flat[15] == 'bo_m' and flat[1] == 'id' then
    id, task_type, payload, hdr = flat[2], flat[4], flat[6], flat[8]
    max, own_ms, bo_i, bo_m = flat[10], flat[12], flat[14], flat[16]
  else
    local f = fresh_fields(flat)
    id, task_type, payload, hdr = f.id, f.type, f.payload, f.hdr
    max, own_ms, bo_i, bo_m = f.max, f.lease_ms, f.bo_i, f.bo_m
  end
  used = used + 1
  local lease_id, lease_ms, stream_id, holder = item(5, 4, used - 1)
  if tonumber(own_ms) > 0 then lease_ms = own_ms else own_ms = false end
  local expire = expiry_of[lease_ms]
  if not expire then
    expire = tostring(now + tonumber(lease_ms))
    expiry_of[lease_ms] = expire
  end
  local args = {'type', task_type, 'payload', payload, 'pri', pri, 'state', LEASED_TEXT,
    'att', '1', 'max', max, 'ctime', created, 'stime', created, 'etime', expire,
    'cur_ms', lease_ms, 'bo_i', bo_i, 'bo_m', bo_m, 'lid', lease_id, 'sid', stream_id}
  if hdr == '' then hdr = false else args[#args + 1] = 'hdr'; args[#args + 1] = hdr end
  if own_ms then args[#args + 1] = 'lease_ms'; args[#args + 1] = own_ms end
  if holder ~= '' then args[#args + 1] = 'lp'; args[#args + 1] = holder end
  redis.call('HSET', task_prefix .. id, unpack(args))
  leases[#leases + 1] = expire
  leases[#leases + 1] = id
  -- The short form (FRESH_REPLY_FIELDS): the rest of a fresh lease is known (state leased,
  -- attempt 1, ready when created, no error, result, group or parents): building and sending
  -- the long one, mostly empty, cost Redis about 5 % more CPU per task.
  returned = returned + #task_type + #payload + (hdr and #hdr or 0) + #pri + #max
    + #created + #expire + (own_ms and #own_ms or 0) + #bo_i + #bo_m + #lease_id
  reply[#reply + 1] = id
  reply[#reply + 1] = {task_type, payload, hdr, pri, max, created, expire, own_ms, bo_i,
    bo_m, lease_id}
end

-- The default group (tasks without a group key): the candidates above, merged in score order.
local h, f = 1, 1
local taken = {}  -- stream index -> how many of its entries were taken (always a prefix)
local function take_default()
  while true do
    local from_held = h <= #held and (f > #fresh or held[h][2] <= fresh[f][1])
    if from_held then
      local id = held[h][1]
      h = h + 1
      redis.call('ZREM', KEYS[1], id)
      local key = task_prefix .. id
      if redis.call('EXISTS', key) == 1 then
        lease(key, id)
        return true
      end
    elseif f <= #fresh then
      local candidate = fresh[f]
      f = f + 1
      taken[candidate[2]] = candidate[3]
      lease_fresh(candidate[4], candidate[6], candidate[5])
      return true
    else
      return false
    end
  end
end
local function default_left()
  return h <= #held or f <= #fresh
end

-- Group keys (prelude: rotate_in): the keys with pending tasks take turns with each other and
-- with the default group, one task per turn, lowest turn first; a group served gets the next
-- turn, so it goes to the back. Within a group, priority then FIFO.
local base = base_of_tasks(task_prefix)
local rotation = base .. 'gk'
local per_key_cap = tonumber(meta[8] or '0')
local leased_per_key = base .. 'gl'
local waiting_keys = base .. 'gw'  -- keys waiting for their next per-key token, by its time
-- Keys whose next token has come rejoin the rotation (at the back, as a new key would).
for _, gk in ipairs(redis.call('ZRANGE', waiting_keys, '-inf', now, 'BYSCORE')) do
  redis.call('ZREM', waiting_keys, gk)
  if redis.call('EXISTS', base .. 'g:' .. gk) == 1 then rotate_in(base, gk) end
end
-- per_key_rate_limit as a GCRA (the token bucket as one number per key): a key's next lease
-- may start at tat - tolerance, where tat advances by one interval per lease. The number is
-- the string <base>gr:<key>, expiring when the bucket would be full again.
local key_rate = tonumber(meta[11] or '0')
local key_interval, key_tolerance = 0, 0
if key_rate > 0 then
  key_interval = 1000 / key_rate
  key_tolerance = (tonumber(meta[12]) - 1) * key_interval
end
-- When key gk may lease next (now or earlier: at once).
local function key_next_ms(gk)
  local tat = tonumber(redis.call('GET', base .. 'gr:' .. gk) or '0')
  return tat - key_tolerance, tat
end
-- Parks a key out of the rotation until its next token.
local function wait_for_token(gk, at)
  redis.call('ZREM', rotation, gk)
  redis.call('ZADD', waiting_keys, math.ceil(at), gk)
end
-- Takes the first task of key gk: whether it took one, and whether the key has more to give.
local function take_from_key(gk)
  local zkey = base .. 'g:' .. gk
  local held_now = tonumber(redis.call('HGET', leased_per_key, gk) or '0')
  local first
  if aging == 0 then
    first = redis.call('ZRANGE', zkey, 0, 0)
  else
    first = by_band(zkey, 1)
    if #first > 0 then first = {first[1][1]} end
  end
  if #first == 0 or (per_key_cap > 0 and held_now >= per_key_cap) then
    redis.call('ZREM', rotation, gk)
    if #first > 0 then redis.call('SADD', base .. 'gp', gk) end  -- parked until a lease ends
    return false, false
  end
  local tat = 0
  if key_rate > 0 then
    local next_ms
    next_ms, tat = key_next_ms(gk)
    if next_ms > now then
      wait_for_token(gk, next_ms)
      return false, false
    end
  end
  local id = first[1]
  redis.call('ZREM', zkey, id)
  local key = task_prefix .. id
  local took = redis.call('EXISTS', key) == 1
  if took then
    lease(key, id)
    held_now = redis.call('HINCRBY', leased_per_key, gk, 1)
    if key_rate > 0 then
      tat = math.max(tat, now) + key_interval
      redis.call('SET', base .. 'gr:' .. gk, tostring(tat), 'PX', math.max(1, math.ceil(tat - now)))
    end
  end
  if redis.call('EXISTS', zkey) == 0 then
    redis.call('ZREM', rotation, gk)
    return took, false
  end
  if per_key_cap > 0 and held_now >= per_key_cap then
    redis.call('ZREM', rotation, gk)
    redis.call('SADD', base .. 'gp', gk)
    return took, false
  end
  if key_rate > 0 and tat - key_tolerance > now then
    wait_for_token(gk, tat - key_tolerance)
    return took, false
  end
  return took, true
end

local leftover  -- whether tasks were left that the limits held back
-- Enough keys for one task each, and a few more in case some are at their cap.
local keyed = redis.call('ZRANGE', rotation, 0, allowed + 15, 'WITHSCORES')
if #keyed == 0 then
  while room() and take_default() do end
  leftover = default_left()
else
  local groups = {}  -- {turn, key, or false for the default group}
  for i = 1, #keyed, 2 do table.insert(groups, {tonumber(keyed[i + 1]), keyed[i]}) end
  if default_left() then table.insert(groups, {tonumber(meta[10] or '0'), false}) end
  table.sort(groups, function(a, b)
    if a[1] ~= b[1] then return a[1] < b[1] end
    return tostring(a[2]) < tostring(b[2])
  end)
  local turn = tonumber(meta[9] or '0')
  local turns = {}  -- key ('' for the default group) -> its new turn
  while #groups > 0 and room() do
    local next_round = {}
    for i, g in ipairs(groups) do
      if not room() then
        for j = i, #groups do table.insert(next_round, groups[j]) end
        break
      end
      local took, more
      if g[2] then
        took, more = take_from_key(g[2])
      else
        took = take_default()
        more = took and default_left()
      end
      if took then
        turn = turn + 1
        turns[g[2] or ''] = turn
      end
      if more then table.insert(next_round, g) end
    end
    groups = next_round
  end
  leftover = #groups > 0
  for gk, t in pairs(turns) do
    if gk == '' then
      redis.call('HSET', KEYS[4], 'dturn', t)
    else
      redis.call('ZADD', rotation, 'XX', t, gk)
    end
  end
  redis.call('HSET', KEYS[4], 'turn', turn)
end
-- The taken entries are the head of their stream: one trim removes them (an XDEL each would
-- walk the stream's node from its start every time).
for index, count in pairs(taken) do
  local stream, pri, ids, after = unpack(streams[index])
  local left = ids[count + 1] or after
  if left then
    redis.call('XTRIM', stream, 'MINID', left)
  else
    redis.call('DEL', stream)
    redis.call('ZREM', KEYS[5], pri)
  end
end

bulk_call('ZADD', KEYS[3], leases)

-- Tasks left for want of room in the reply are due now: the dispatcher leases again at once.
if leftover and used < allowed then reply[2] = now end

-- A key waiting for its token makes its time a due time: the dispatcher leases again then.
local first_waiting = redis.call('ZRANGE', waiting_keys, 0, 0, 'WITHSCORES')
if #first_waiting > 0 then
  local at = tonumber(first_waiting[2])
  if reply[2] < 0 or at < reply[2] then reply[2] = at end
end

-- Limits: spend the tokens, and say when tasks held back may go.
local held_back = used == allowed and allowed < n and leftover
if tokens then
  tokens = tokens - used
  redis.call('HSET', KEYS[4], 'rl_tok', tostring(tokens), 'rl_at', now)
  if held_back and tokens < 1 then
    local token_due = now + bucket_wait_ms(tokens, rate, 1)
    if reply[2] < 0 or token_due < reply[2] then reply[2] = token_due end
    reply[3] = 2
  end
end
if held_back and cap > 0 and used >= cap_left then
  redis.call('HSET', KEYS[4], 'blocked', '1')
elseif meta[7] then
  redis.call('HDEL', KEYS[4], 'blocked')
end
return reply
