-- Add ARGV[1] to an integer entry (created at 0 with the cache's expiry when absent).
-- KEYS[1] entry, KEYS[2] LRU index (scores: microseconds of last use); ARGV[2] ttl ms, ARGV[3] idle ms, ARGV[4] "1" when indexed.
local v = redis.call('GET', KEYS[1])
if v and not string.match(v, '^%-?%d+$') then
  return redis.error_reply('IMMUTANT entry is not an integer')
end
local n = redis.call('INCRBY', KEYS[1], ARGV[1])
local ttl, idle = tonumber(ARGV[2]), tonumber(ARGV[3])
if idle > 0 then
  redis.call('PEXPIRE', KEYS[1], idle)
elseif not v and ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
if ARGV[4] == '1' then
  local t = redis.call('TIME')
  redis.call('ZADD', KEYS[2], t[1] * 1000000 + t[2], KEYS[1])
end
return n
