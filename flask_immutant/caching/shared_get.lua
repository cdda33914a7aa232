-- Read one cache entry, sliding its idle expiry and its place in the LRU index.
-- KEYS[1] entry, KEYS[2] LRU index (scores: microseconds of last use); ARGV[1] idle ms (0: none), ARGV[2] "1" when indexed.
-- An entry with an absolute deadline ("\1" + 13 digits) never slides past it.
local v = redis.call('GET', KEYS[1])
if not v then return false end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local idle = tonumber(ARGV[1])
if idle > 0 then
  local px = idle
  if string.byte(v, 1) == 1 then
    local left = tonumber(string.sub(v, 2, 14)) - now
    if left <= 0 then
      redis.call('DEL', KEYS[1])
      return false
    end
    if left < px then px = left end
  end
  redis.call('PEXPIRE', KEYS[1], px)
end
if ARGV[2] == '1' then redis.call('ZADD', KEYS[2], t[1] * 1000000 + t[2], KEYS[1]) end
return v
