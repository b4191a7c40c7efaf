-- group_keys.lua: read one page of a queue's group keys, the largest backlog first, with each
-- key's pending and leased counts and its oldest pending task's ready time. Reads only.
--
-- KEYS[1]  tb:{q}:gk   zset  keys with pending tasks, by turn (the rotation)
-- KEYS[2]  tb:{q}:gp   set   keys parked at per_key_max_concurrency
-- KEYS[3]  tb:{q}:gw   zset  keys waiting for their per_key_rate_limit token
-- KEYS[4]  tb:{q}:gl   hash  key -> tasks leased
-- ARGV     (store/argv.py GroupKeysArgs)
--   group_prefix   tb:{q}:g:  (each key's pending zset is derived from it: same hash tag)
--   scan_limit     distinct keys read at most (parked, waiting, in the rotation, then leased
--                  only, in that order: a key found twice keeps its first state)
--   page_size      keys returned at most
--   after_pending, after_key   the last key of the previous page ('-1', '': the first page)
--
-- Keys are ranked by pending count (descending), then name. With more keys than scan_limit,
-- the ranking is over the keys read, so a key beyond them is not shown.
--
-- Returns {now, in rotation (ZCARD gk), parked (SCARD gp), waiting (ZCARD gw), with leases
-- (HLEN gl), keys read, more (1: a page follows), then per key: name, state ('r' in the
-- rotation, 'p' parked, 'w' waiting for a token, 'l' leased only), pending, leased,
-- oldest ready ms (-1: none pending)}.

local now = now_ms()
local group_prefix, scan_limit, page_size, after_pending, after_key = unpack(ARGV, 1, 5)
scan_limit, page_size, after_pending = tonumber(scan_limit), tonumber(page_size),
  tonumber(after_pending)

local state, names = {}, {}
local function found(gk, s)
  if state[gk] == nil and #names < scan_limit then
    state[gk] = s
    names[#names + 1] = gk
  end
end
-- SSCAN/HSCAN from the start: the same keys on every call while the set does not change, so
-- pages of one ranking line up. Bounded by entries read, not by keys found.
local function scan(command, key, s, stride)
  local cursor, read = '0', 0
  repeat
    local reply = redis.call(command, key, cursor, 'COUNT', 500)
    cursor = reply[1]
    for i = 1, #reply[2], stride do found(reply[2][i], s) end
    read = read + #reply[2] / stride
  until cursor == '0' or read >= scan_limit or #names >= scan_limit
end

scan('SSCAN', KEYS[2], 'p', 1)
for _, gk in ipairs(redis.call('ZRANGE', KEYS[3], 0, scan_limit - 1)) do found(gk, 'w') end
for _, gk in ipairs(redis.call('ZRANGE', KEYS[1], 0, scan_limit - 1)) do found(gk, 'r') end
scan('HSCAN', KEYS[4], 'l', 2)

local pending = {}
for _, gk in ipairs(names) do
  if state[gk] == 'l' then
    pending[gk] = 0
  else
    pending[gk] = redis.call('ZCARD', group_prefix .. gk)
  end
end
local function before(a, b)
  if pending[a] ~= pending[b] then return pending[a] > pending[b] end
  return a < b
end
local ranked = {}
for _, gk in ipairs(names) do
  if after_pending < 0 or pending[gk] < after_pending
      or (pending[gk] == after_pending and gk > after_key) then
    ranked[#ranked + 1] = gk
  end
end
table.sort(ranked, before)

-- The earliest ready time over a key's priority bands (stats.lua's walk, at most 64 bands:
-- beyond that it is a lower bound on the age).
local function oldest_ready(zkey)
  local oldest, from = -1, '-inf'
  for _ = 1, 64 do
    local first = redis.call('ZRANGE', zkey, from, '+inf', 'BYSCORE', 'LIMIT', 0, 1, 'WITHSCORES')
    if #first == 0 then break end
    local score = tonumber(first[2])
    local band = math.floor(score / BAND)
    local ready = score - band * BAND
    if oldest < 0 or ready < oldest then oldest = ready end
    from = tostring((band + 1) * BAND)
  end
  return oldest
end

local more = 0
if #ranked > page_size then more = 1 end
local reply = {now, redis.call('ZCARD', KEYS[1]), redis.call('SCARD', KEYS[2]),
  redis.call('ZCARD', KEYS[3]), redis.call('HLEN', KEYS[4]), #names, more}
for i = 1, math.min(page_size, #ranked) do
  local gk = ranked[i]
  local oldest = -1
  if pending[gk] > 0 then oldest = oldest_ready(group_prefix .. gk) end
  local leased = tonumber(redis.call('HGET', KEYS[4], gk) or '0')
  for _, v in ipairs({gk, state[gk], pending[gk], leased, oldest}) do reply[#reply + 1] = v end
end
return reply
