-- watch.lua: mark a task as watched (WatchTask), so that the script that finishes it (ack,
-- nack, reclaim_expired, cancel) announces its id on the finished channel (keys.py
-- FINISHED_CHANNEL). Never makes a hash: a missing task stays missing, and a fresh task (no
-- hash yet, data-model.md "Fresh tasks") is marked by the watcher's next read after its first
-- transition gives it one.
--
-- KEYS[1]  tb:{q}:t:<id>   task hash
-- ARGV     none
--
-- Returns 1 when the hash exists (and is now marked), 0 when it does not.

if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'w', '1')
return 1
