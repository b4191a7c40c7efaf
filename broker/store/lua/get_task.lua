-- get_task.lua: read one task, wherever it is: its hash, or (a fresh pending task, which has
-- none yet) its entry in its priority's stream.
--
-- KEYS[1]  tb:{q}:t:<id>      task hash
-- KEYS[2]  tb:{q}:fp          zset  priorities that have a fresh stream
-- ARGV     (store/argv.py GetArgs)
--   id, entry_id, fresh_prefix   the task, and where it is if it is still fresh
--
-- Returns the hash (HGETALL: {field, value, ...}); for a fresh task the fields its hash would
-- have (as enqueue.lua writes them); {} when there is no such task.

local id, entry_id, fresh_prefix = unpack(ARGV, 1, 3)
local h = redis.call('HGETALL', KEYS[1])
if #h > 0 then return h end
local stream, pri, f = find_fresh(fresh_prefix, KEYS[2], id, entry_id)
if not stream then return {} end
local ms = entry_ms(entry_id)
local reply = {'type', f.type, 'payload', f.payload, 'pri', pri, 'att', 0, 'max', f.max,
  'bo_i', f.bo_i, 'bo_m', f.bo_m, 'ctime', ms, 'state', PENDING, 'stime', ms}
if f.hdr ~= '' then table.insert(reply, 'hdr'); table.insert(reply, f.hdr) end
if f.lease_ms ~= '0' then table.insert(reply, 'lease_ms'); table.insert(reply, f.lease_ms) end
return reply
