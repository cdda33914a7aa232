-- Acquire a lease if it is free (or already ours). KEYS: lease, fence counter, last holder.
-- ARGV: owner token, ttl_ms, holder info (JSON object without owner/fence).
-- Returns {fencing token, previous holder's JSON or false}, or {false, current holder's JSON} if
-- another owner holds it (so a contender can judge that holder without another round trip).
-- The last-holder key is deleted by a release: still there means the previous holder never
-- released (it crashed or lost the store), which the caller reports as a failover.
-- The token is max(last + 1, server time in ms): strictly increasing even if the store lost its
-- last writes (AOF fsync'd once a second, a replica promoted), as long as its clock moves forward.
local current = redis.call('GET', KEYS[1])
if current then
  local held = cjson.decode(current)
  if held.owner == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return {held.fence, false}
  end
  return {false, current}
end
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local last = tonumber(redis.call('GET', KEYS[2]) or '0')
local fence = math.max(last + 1, now_ms)
redis.call('SET', KEYS[2], string.format('%d', fence))
local info = cjson.decode(ARGV[3])
info.owner = ARGV[1]
info.fence = fence
local encoded = cjson.encode(info)
redis.call('SET', KEYS[1], encoded, 'PX', ARGV[2])
local previous = redis.call('GET', KEYS[3])
redis.call('SET', KEYS[3], encoded)
return {fence, previous}
