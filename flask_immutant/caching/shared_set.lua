-- Write one cache entry: set, add (only if absent) or put-if-absent (returns the present value).
-- KEYS[1] entry, KEYS[2] LRU index (scores: microseconds of last use).
-- ARGV[1] value, ARGV[2] ttl ms, ARGV[3] idle ms, ARGV[4] max entries (0: none), ARGV[5] mode.
-- With both ttl and idle the entry expires after idle ms unused, and never after its ttl: the
-- absolute deadline travels in the value ("\1" + 13 digits of ms), for cache_get.lua.
local mode = ARGV[5]
if mode ~= 'set' then
  local present = redis.call('GET', KEYS[1])
  if present then
    if mode == 'add' then return false end
    return present
  end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl, idle, max = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local v, px = ARGV[1], 0
if ttl > 0 and idle > 0 then
  v = '\1' .. string.format('%013d', now + ttl) .. v
  px = math.min(ttl, idle)
elseif ttl > 0 then
  px = ttl
elseif idle > 0 then
  px = idle
end
if px > 0 then
  redis.call('SET', KEYS[1], v, 'PX', px)
else
  redis.call('SET', KEYS[1], v)
end
if max > 0 then
  redis.call('ZADD', KEYS[2], t[1] * 1000000 + t[2], KEYS[1])
  local over = redis.call('ZCARD', KEYS[2]) - max
  if over > 0 then
    local evicted = redis.call('ZPOPMIN', KEYS[2], over)
    for i = 1, #evicted, 2 do redis.call('DEL', evicted[i]) end
  end
end
if mode == 'pia' then return false end
return 1
