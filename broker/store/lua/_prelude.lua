-- _prelude.lua: prepended to every script by scripts.py, so all scripts read the clock and
-- shape task state the same way.
--
-- Task hash fields (tb:{q}:t:<id>; stored names, never renamed: TASK_HASH_FIELDS in
-- store/redis_store.py says which Task field each one holds):
--   type payload hdr pri state att max lease_ms cur_ms ctime stime etime ftime
--   bo_i bo_m (the retry policy's initial_backoff and max_backoff, ms)
--   lid (current lease) sid (the Lease stream holding it, '' once its stream ended: detached)
--   lp (the principal that leased it last, absent without a policy: only it may settle, extend
--   or resume the lease)
--   ereason (why a detached lease will end, if not resumed) slid/skind (last settled lease and
--   how: 'a' ack, 'n' nack) errs res
--   Dependencies (issue 17, docs/workflows.md): npar (parents), wait (parents still awaited,
--   while WAITING), fpol (parent failure policy: c cancel, r run, w wait), wdel / wat (the
--   delay or schedule time that applies from release), kid (set once the task has children),
--   w (watched: its end is published on tb:finished)
-- States match taskbroker.v1.TaskState.

local SCHEDULED, PENDING, LEASED, SUCCEEDED, DEAD, CANCELLED, WAITING = 1, 2, 3, 4, 5, 6, 7
-- Announced when a queue's workflow outbox <base>wf gains an entry (the outbox mover drains it)
-- and when a watched task ends (the WatchTask RPC): store/keys.py names them too.
local FLOW_CHANNEL, FINISHED_CHANNEL = 'tb:flow', 'tb:finished'

-- Pending scores put higher priority first and FIFO by ready time within a priority:
-- (1000 - priority) * 2^42 + ready_ms. Priorities -1000..1000 keep it below 2^53 (exact doubles);
-- 2^42 ms lasts until the year 2109.
local BAND = 4398046511104
-- Keep the most recent errors only, so a task that fails forever has bounded memory.
local MAX_ERRORS = 32

-- ARGV is a head of named values, then, in batch scripts, items of `width` fields each. A script
-- names them once: `local a, b = unpack(ARGV, 1, 2)` for the head, `local x, y = item(2, 2, i)`
-- for item i (from 0). RedisStore builds ARGV from the same names (store/argv.py), and
-- tests/test_pinned_constants.py fails when the two drift.
local function item(head, width, i)
  local first = head + i * width + 1
  return unpack(ARGV, first, first + width - 1)
end

-- A batch script gathers the members it adds to or removes from one sorted set, and sends them
-- in one command at its end: passing a redis.call from Lua to the command and back costs about
-- as much as a small command itself. Chunks keep unpack under Lua's stack limit; a ZADD's
-- chunk always ends on a whole score-member pair.
local BULK_ARGS = 1000
local function bulk_call(command, key, args)
  for first = 1, #args, BULK_ARGS do
    redis.call(command, key, unpack(args, first, math.min(first + BULK_ARGS - 1, #args)))
  end
end

-- Redis is the one clock: every expiry and due time is judged against this.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function pending_score(priority, ready_ms)
  return (1000 - priority) * BAND + ready_ms
end

-- Fresh pending tasks (enqueue.lua) are entries of tb:{q}:f:<priority>, with these fields, and
-- no key of their own until they leave that state; their create and ready time is the entry
-- id's ms. The fields are always written in this order, so Redis stores their names once.
local function entry_ms(entry_id)
  return tonumber(string.sub(entry_id, 1, string.find(entry_id, '-', 1, true) - 1))
end

-- A fresh task's fields by name, from an entry's flat {name, value, ...}.
local function fresh_fields(flat)
  local f = {}
  for i = 1, #flat, 2 do f[flat[i]] = flat[i + 1] end
  return f
end

-- Writes the hash of a fresh task leaving its stream, as enqueue.lua writes a pending task's.
local function fresh_to_hash(key, pri, entry_id, f)
  local ms = entry_ms(entry_id)
  redis.call('HSET', key, 'type', f.type, 'payload', f.payload, 'pri', pri, 'att', 0,
    'max', f.max, 'bo_i', f.bo_i, 'bo_m', f.bo_m, 'ctime', ms, 'state', PENDING, 'stime', ms)
  if f.hdr ~= '' then redis.call('HSET', key, 'hdr', f.hdr) end
  if f.lease_ms ~= '0' then redis.call('HSET', key, 'lease_ms', f.lease_ms) end
end

-- The fresh task `id` stored under entry_id, if it is still fresh: its stream, priority and
-- fields (fresh_fields), else nil. Looks in each priority in use (a handful, in practice).
local function find_fresh(fresh_prefix, priorities_key, id, entry_id)
  for _, pri in ipairs(redis.call('ZRANGE', priorities_key, 0, -1)) do
    local stream = fresh_prefix .. pri
    local found = redis.call('XRANGE', stream, entry_id, entry_id)
    if #found > 0 then
      local f = fresh_fields(found[1][2])
      if f.id == id then return stream, tonumber(pri), f end
    end
  end
  return nil
end

-- Drops a fresh stream that has no entry left, and its priority from the index, so an empty
-- queue holds no fresh keys (maintain.lua finds it empty).
local function drop_if_empty(stream, priorities_key, pri)
  if redis.call('XLEN', stream) == 0 then
    redis.call('DEL', stream)
    redis.call('ZREM', priorities_key, pri)
  end
end

-- Counts fresh tasks and finds the earliest one's ready time (-1 when none).
local function fresh_count(fresh_prefix, priorities_key)
  local count, oldest = 0, -1
  for _, pri in ipairs(redis.call('ZRANGE', priorities_key, 0, -1)) do
    local stream = fresh_prefix .. pri
    count = count + redis.call('XLEN', stream)
    local first = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
    if #first > 0 then
      local ms = entry_ms(first[1][1])
      if oldest < 0 or ms < oldest then oldest = ms end
    end
  end
  return count, oldest
end

-- Group keys (TaskSpec.group_key, the task hash's `gk`). A pending task with one waits in its
-- key's zset <base>g:<key> (scored as the pending zset), not in the pending zset; the keys that
-- have pending tasks take turns in the rotation <base>gk (key -> turn, lowest first: lease.lua).
-- A key at the queue's per_key_max_concurrency is parked in the set <base>gp, out of the
-- rotation, until one of its leases ends; <base>gl counts each key's leases. A key over the
-- per_key_rate_limit waits in the zset <base>gw (key -> when its next token is due) and
-- rejoins the rotation then (lease.lua); its bucket is the string <base>gr:<key>. <base> is the
-- queue's key prefix tb:{q}: (every key under the queue's tag), taken from a key name a script
-- was given.
local function base_of_pending(pending_key) return string.sub(pending_key, 1, -8) end
local function base_of_tasks(task_prefix) return string.sub(task_prefix, 1, -3) end

-- Puts a key with pending tasks at the back of the rotation, unless it is there, parked, or
-- waiting for its next per-key token (lease.lua moves it back when the token is due).
local function rotate_in(base, gk)
  if redis.call('SISMEMBER', base .. 'gp', gk) == 1 then return end
  if redis.call('ZSCORE', base .. 'gw', gk) then return end
  local turn = tonumber(redis.call('HGET', base .. 'meta', 'turn') or '0')
  redis.call('ZADD', base .. 'gk', 'NX', turn, gk)
end

-- Adds a task to the pending tasks of its group: its key's zset, or the pending zset.
local function add_pending(id, pending_key, score, gk)
  if gk and gk ~= '' then
    local base = base_of_pending(pending_key)
    redis.call('ZADD', base .. 'g:' .. gk, score, id)
    rotate_in(base, gk)
  else
    redis.call('ZADD', pending_key, score, id)
  end
end

-- Removes a pending task from its key's zset; a key left with none leaves the rotation.
local function remove_grouped(base, gk, id)
  local zkey = base .. 'g:' .. gk
  redis.call('ZREM', zkey, id)
  if redis.call('EXISTS', zkey) == 0 then
    redis.call('ZREM', base .. 'gk', gk)
    redis.call('SREM', base .. 'gp', gk)
    redis.call('ZREM', base .. 'gw', gk)
  end
end

-- A lease of a task of key gk ended (acked, failed, expired, released or cancelled): one fewer
-- leased for the key. A key parked at its cap goes back into the rotation, and the queue's
-- pumps are woken (when wake_channel is given: callers that publish anyway pass nil).
local function group_lease_ended(base, gk, wake_channel, queue)
  if not gk or gk == '' then return end
  if redis.call('HINCRBY', base .. 'gl', gk, -1) <= 0 then redis.call('HDEL', base .. 'gl', gk) end
  if redis.call('SREM', base .. 'gp', gk) == 1 then
    if redis.call('EXISTS', base .. 'g:' .. gk) == 1 then rotate_in(base, gk) end
    if wake_channel then redis.call('PUBLISH', wake_channel, queue) end
  end
end

-- Whether an operator configured the queue (paused, or a limit: store/queue_meta.py), so it is
-- kept while empty. The meta hash's other fields are state that may go with it.
local function has_settings(meta_key)
  for _, v in ipairs(redis.call('HMGET', meta_key, 'paused', 'mc', 'rl_rate', 'erl_rate',
      'pk_mc', 'pk_rate')) do
    if v then return true end
  end
  return false
end

-- Whether any task waits under a group key (in the rotation, or parked).
local function has_grouped(base)
  return redis.call('EXISTS', base .. 'gk', base .. 'gp', base .. 'gw') > 0
end

-- Counts the tasks waiting under group keys, and finds the earliest ready time of each key's
-- next task (-1 when none), over at most `limit` keys of each kind (a lower bound beyond).
local function grouped_count(base, limit)
  local count, oldest = 0, -1
  for _, set in ipairs({'gk', 'gp', 'gw'}) do
    local members
    if set ~= 'gp' then
      members = redis.call('ZRANGE', base .. set, 0, limit - 1)
    else
      members = redis.call('SRANDMEMBER', base .. set, limit)
    end
    for _, gk in ipairs(members) do
      local zkey = base .. 'g:' .. gk
      count = count + redis.call('ZCARD', zkey)
      local first = redis.call('ZRANGE', zkey, 0, 0, 'WITHSCORES')
      if #first > 0 then
        local score = tonumber(first[2])
        local ready = score - math.floor(score / BAND) * BAND
        if oldest < 0 or ready < oldest then oldest = ready end
      end
    end
  end
  return count, oldest
end

-- Stores a new task as a hash (enqueue.lua, when it cannot stay fresh; fire_schedule.lua) and
-- files it as pending (its group key's, if it has one: add_pending), or scheduled when due
-- later. t: type payload pri max bo_i bo_m hdr lease_ms gk, as enqueue.lua reads them; payload
-- nil when it is in the hash already (staged). With t.parents (their ids) it is filed WAITING
-- instead, with t.fpol, and t.wdel (ms, -1: none) or t.wat (ms) applying from its release.
local function store_task_hash(key, id, t, now, due, pending_key, scheduled_key)
  if t.payload then
    redis.call('HSET', key, 'type', t.type, 'payload', t.payload, 'pri', t.pri, 'att', 0,
      'max', t.max, 'bo_i', t.bo_i, 'bo_m', t.bo_m, 'ctime', now)
  else
    redis.call('HSET', key, 'type', t.type, 'pri', t.pri, 'att', 0, 'max', t.max,
      'bo_i', t.bo_i, 'bo_m', t.bo_m, 'ctime', now)
  end
  if t.hdr ~= '' then redis.call('HSET', key, 'hdr', t.hdr) end
  if t.lease_ms ~= '0' then redis.call('HSET', key, 'lease_ms', t.lease_ms) end
  if t.gk and t.gk ~= '' then redis.call('HSET', key, 'gk', t.gk) end
  if t.parents then  -- WAITING for its parents; the outbox mover links it to each (link.lua)
    local base = base_of_pending(pending_key)
    redis.call('HSET', key, 'state', WAITING, 'stime', now, 'npar', #t.parents,
      'wait', #t.parents, 'fpol', t.fpol, 'wdel', t.wdel)
    if t.wat then redis.call('HSET', key, 'wat', t.wat) end
    local flat = {'#', table.concat(t.parents, ' ')}  -- their order ('#' is no task id)
    for _, parent in ipairs(t.parents) do
      table.insert(flat, parent)
      table.insert(flat, '')
    end
    redis.call('HSET', key .. ':p', unpack(flat))
    redis.call('ZADD', base .. 'waiting', now, id)
    redis.call('XADD', base .. 'wf', '*', 'k', 'l', 'c', id)
    return
  end
  if due > now then
    redis.call('HSET', key, 'state', SCHEDULED, 'stime', due)
    redis.call('ZADD', scheduled_key, due, id)
  else
    redis.call('HSET', key, 'state', PENDING, 'stime', now)
    add_pending(id, pending_key, pending_score(t.pri, now), t.gk)
  end
end

-- The queue name in a key prefix tb:{q}:.
local function queue_of(base) return string.sub(base, 5, -3) end

-- Children: a task's parents are the hash <task>:p (parent id -> '' until it ended as its
-- child needs, then the state digit, its type, a space and, for SUCCEEDED, its result); its
-- children the set
-- <task>:k of their ids. A task that ended tells its children through its queue's outbox, the
-- stream <base>wf, drained by every replica's outbox mover (broker/workflow/mover.py), which
-- runs resolve.lua in each child's own slot: parents and children may live in different
-- queues, so different Cluster slots. An entry holds k='f' (finished), p (local id), s (state),
-- t (its type: a child decrypts an encrypted result with it), r (result), and c (the children's
-- ids, space-separated) when there are at most 1,000; more are copied to <base>wfk:<entry id>,
-- which the mover reads and deletes with the entry, so trimming the parent meanwhile loses none
-- (it expires after 30 days, should a mover die between the two deletes). `kid` and `w` are the
-- task hash's flags, when the caller read them already.
local MAX_LISTED_CHILDREN = 1000
local SNAPSHOT_TTL_MS = 30 * 86400 * 1000
local function task_finished(base, id, state, kid, w)
  local key = base .. 't:' .. id
  if kid == nil then
    local f = redis.call('HMGET', key, 'kid', 'w')
    kid, w = f[1], f[2]
  end
  if kid then
    local t = redis.call('HMGET', key, 'type', 'res')
    local entry = {'k', 'f', 'p', id, 's', state, 't', t[1] or ''}
    if state == SUCCEEDED then
      table.insert(entry, 'r')
      table.insert(entry, t[2] or '')
    end
    local many = redis.call('SCARD', key .. ':k') > MAX_LISTED_CHILDREN
    if not many then
      table.insert(entry, 'c')
      table.insert(entry, table.concat(redis.call('SMEMBERS', key .. ':k'), ' '))
    end
    local entry_id = redis.call('XADD', base .. 'wf', '*', unpack(entry))
    if many then
      redis.call('COPY', key .. ':k', base .. 'wfk:' .. entry_id)
      redis.call('PEXPIRE', base .. 'wfk:' .. entry_id, SNAPSHOT_TTL_MS)
    end
    redis.call('PUBLISH', FLOW_CHANNEL, queue_of(base))
  end
  if w then redis.call('PUBLISH', FINISHED_CHANNEL, queue_of(base) .. ':' .. id) end
end

-- Cancels a WAITING task (cancel.lua; resolve.lua when a parent failed): it leaves the waiting
-- set for the finished ones, and tells its own children.
local function cancel_waiting(base, id, now)
  local key = base .. 't:' .. id
  redis.call('ZREM', base .. 'waiting', id)
  redis.call('HSET', key, 'state', CANCELLED, 'ftime', now)
  redis.call('ZADD', base .. 'done', now, id)
  redis.call('HINCRBY', base .. 'stats', 'cancel', 1)
  task_finished(base, id, CANCELLED)
end

-- Whether a queue holds workflow state: waiting tasks, or outbox entries not yet moved.
local function has_workflow(base)
  return redis.call('EXISTS', base .. 'waiting', base .. 'wf') > 0
end

local function to_pending(key, id, pending_key, now)
  local t = redis.call('HMGET', key, 'pri', 'gk')
  add_pending(id, pending_key, pending_score(tonumber(t[1] or '0'), now), t[2])
  redis.call('HSET', key, 'state', PENDING, 'stime', now)
end

local function append_error(key, attempt, now, message)
  local raw = redis.call('HGET', key, 'errs')
  local errs = {}
  if raw then errs = cjson.decode(raw) end
  table.insert(errs, {attempt, now, message})
  while #errs > MAX_ERRORS do table.remove(errs, 1) end
  redis.call('HSET', key, 'errs', cjson.encode(errs), 'lerr', message)
end

-- Moves up to `limit` due tasks from scheduled to pending. A task is ready from its due time,
-- not from when this runs: FIFO and priority_aging count from then. Returns how many moved.
local function promote_due(scheduled_key, pending_key, prefix, now, limit)
  local due = redis.call('ZRANGE', scheduled_key, '-inf', now, 'BYSCORE', 'LIMIT', 0, limit,
    'WITHSCORES')
  for i = 1, #due, 2 do
    local id = due[i]
    local key = prefix .. id
    redis.call('ZREM', scheduled_key, id)
    if redis.call('EXISTS', key) == 1 then to_pending(key, id, pending_key, tonumber(due[i + 1])) end
  end
  return #due / 2
end

-- The score of the earliest scheduled task, or -1 when none is scheduled.
local function next_due(scheduled_key)
  local first = redis.call('ZRANGE', scheduled_key, 0, 0, 'WITHSCORES')
  if #first == 0 then return -1 end
  return tonumber(first[2])
end

-- Whether a current lease is bound to a principal other than `holder`. Binding applies only when
-- both are named: a lease made without a policy, or presented without one, is anyone's (as
-- before policies existed).
local function foreign(lp, holder)
  return lp ~= false and lp ~= '' and holder ~= '' and lp ~= holder
end

-- Binds a fresh lease to its principal ('' without a policy: unbound).
local function bind_lease(key, holder)
  if holder == '' then
    redis.call('HDEL', key, 'lp')
  else
    redis.call('HSET', key, 'lp', holder)
  end
end

-- Fields that describe the current lease: cleared whenever a lease ends, however it ends.
local function clear_lease(key)
  redis.call('HDEL', key, 'lid', 'etime', 'sid', 'ereason')
end

-- A lease that ends without an ack (expired, or detached from its stream and not resumed): the
-- attempt is spent, so the task goes back to pending, or to dead letters when out of attempts.
-- A detached lease records its own reason ('lease stream closed'). Returns 1 when dead-lettered.
local function end_lease(key, id, keys, now, reason)
  local t = redis.call('HMGET', key, 'att', 'max', 'ereason', 'gk')
  local att, max = tonumber(t[1] or '0'), tonumber(t[2] or '1')
  if t[3] then reason = t[3] end
  redis.call('ZREM', keys.leased, id)
  group_lease_ended(base_of_pending(keys.pending), t[4], nil, nil)  -- the caller wakes
  clear_lease(key)
  append_error(key, att, now, reason)
  redis.call('HINCRBY', keys.stats, 'reclaim', 1)
  if att >= max then
    redis.call('HSET', key, 'state', DEAD, 'ftime', now)
    redis.call('ZADD', keys.dead, now, id)
    redis.call('HINCRBY', keys.stats, 'dead', 1)
    task_finished(base_of_pending(keys.pending), id, DEAD)
    return 1
  end
  to_pending(key, id, keys.pending, now)
  return 0
end

-- Ends up to `limit` leases of a queue that expired by `now` (end_lease). Returns how many.
local function reclaim_expired(keys, prefix, now, limit)
  local expired = redis.call('ZRANGE', keys.leased, '-inf', now, 'BYSCORE', 'LIMIT', 0, limit)
  for _, id in ipairs(expired) do
    local key = prefix .. id
    if redis.call('EXISTS', key) == 1 then
      end_lease(key, id, keys, now, 'lease expired')
    else
      redis.call('ZREM', keys.leased, id)
    end
  end
  return #expired
end

-- Deletes up to `limit` tasks of a set of finished tasks (or dead letters) scored up to
-- `cutoff` ms. A dead parent trimmed tells its children it is gone (as CANCELLED), so those
-- that wait for its redrive (fpol 'w') do not wait forever. Returns how many.
local function trim_before(set_key, prefix, cutoff, limit)
  local old = redis.call('ZRANGE', set_key, '-inf', cutoff, 'BYSCORE', 'LIMIT', 0, limit)
  local base = base_of_tasks(prefix)
  for _, id in ipairs(old) do
    redis.call('ZREM', set_key, id)
    local key = prefix .. id
    local t = redis.call('HMGET', key, 'kid', 'state')
    if t[1] and tonumber(t[2]) == DEAD then task_finished(base, id, CANCELLED, t[1], false) end
    redis.call('DEL', key, key .. ':p', key .. ':k')
  end
  return #old
end

-- Token buckets (a queue's rate_limit and enqueue_rate_limit) live in its meta hash: settings
-- <p>_rate (tokens per second) and <p>_burst, state <p>_tok (tokens left) at <p>_at (ms).
-- Returns the tokens held at `now` (refilled from Redis's clock) and the rate, or nil when the
-- bucket is off. A bucket never used is full.
local function bucket_tokens(rate, burst, tok, at, now)
  rate = tonumber(rate or '0')
  if rate <= 0 then return nil, 0 end
  burst = tonumber(burst)
  if not tok then return burst, rate end
  return math.min(burst, tonumber(tok) + math.max(0, now - tonumber(at)) * rate / 1000), rate
end

-- The ms from `now` until a bucket holding `tokens` holds `want`.
local function bucket_wait_ms(tokens, rate, want)
  return math.max(1, math.ceil((want - tokens) * 1000 / rate))
end

-- lease.lua marks a queue 'blocked' when max_concurrency held tasks back, so every replica's
-- pump for it sleeps; a script that frees a leased slot wakes them (once) here.
local function wake_if_blocked(meta_key, wake_channel, queue)
  if redis.call('HGET', meta_key, 'blocked') then
    redis.call('HDEL', meta_key, 'blocked')
    redis.call('PUBLISH', wake_channel, queue)
  end
end
