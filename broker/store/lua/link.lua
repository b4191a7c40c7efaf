-- link.lua: make a task the parent of a child enqueued WAITING for it. The outbox mover runs it
-- in the parent's slot for each link entry of the child's queue (docs/workflows.md).
--
-- KEYS[1]  tb:{p}:t:<id>      the parent's task hash
-- KEYS[2]  tb:{p}:fp          zset  priorities that have a fresh stream
-- KEYS[3]  tb:{p}:pending     zset
-- ARGV     (store/argv.py LinkArgs)
--   id, entry_id, fresh_prefix   the parent, and where it is if it is still fresh
--   child                        the child's task id (<queue>:<local id>)
--
-- A fresh parent gets its hash (and a pending entry) first: only a hash carries the `kid` flag
-- that makes the parent's end tell its children (prelude's task_finished). Linking twice is
-- harmless (a set).
-- Returns {'linked'} (the child hears when the parent ends), {'ended', state, result, type} (it ended
-- already: the mover resolves the child at once) or {'gone'} (no such task: trimmed).

local id, entry_id, fresh_prefix, child = unpack(ARGV, 1, 4)
local key = KEYS[1]
local t = redis.call('HMGET', key, 'state', 'res', 'type')
if not t[1] then
  local stream, pri, f = find_fresh(fresh_prefix, KEYS[2], id, entry_id)
  if not stream then return {'gone'} end
  redis.call('XDEL', stream, entry_id)
  drop_if_empty(stream, KEYS[2], pri)
  fresh_to_hash(key, pri, entry_id, f)
  redis.call('ZADD', KEYS[3], pending_score(pri, entry_ms(entry_id)), id)
  t = {tostring(PENDING), false, f.type}
end
redis.call('SADD', key .. ':k', child)
redis.call('HSET', key, 'kid', '1')
local state = tonumber(t[1])
if state == SUCCEEDED or state == DEAD or state == CANCELLED then
  return {'ended', state, t[2] or '', t[3] or ''}
end
return {'linked'}
