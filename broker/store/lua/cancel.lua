-- cancel.lua: cancel a task that has not finished; a held lease is revoked with it.
--
-- KEYS[1]  tb:{q}:t:<id>      task hash
-- KEYS[2]  tb:{q}:pending     zset
-- KEYS[3]  tb:{q}:scheduled   zset
-- KEYS[4]  tb:{q}:leased      zset
-- KEYS[5]  tb:{q}:done        zset  id -> finish time (ms)
-- KEYS[6]  tb:{q}:stats       hash
-- ARGV     (store/argv.py CancelArgs)
--   id       task id (local part)
--
-- Returns {'ok', lease_id or ''} when cancelled, {'final', state} when already finished, {'nf'}.

local now = now_ms()
local id = unpack(ARGV, 1, 1)
local t = redis.call('HMGET', KEYS[1], 'state', 'lid')
if not t[1] then return {'nf'} end
local state = tonumber(t[1])
if state ~= SCHEDULED and state ~= PENDING and state ~= LEASED then return {'final', state} end
redis.call('ZREM', KEYS[2], id)
redis.call('ZREM', KEYS[3], id)
redis.call('ZREM', KEYS[4], id)
clear_lease(KEYS[1])
redis.call('HSET', KEYS[1], 'state', CANCELLED, 'ftime', now)
redis.call('ZADD', KEYS[5], now, id)
redis.call('HINCRBY', KEYS[6], 'cancel', 1)
return {'ok', t[2] or ''}
