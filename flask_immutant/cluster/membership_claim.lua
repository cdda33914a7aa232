-- Claim a node name and join: the claim key holds the owner token with a TTL of the failure
-- timeout. KEYS: claim, members hash, events channel. ARGV: token, ttl_ms, name, record, replace.
-- ARGV[5] is a token the caller proved dead (same host, pid gone); it may be replaced at once.
-- Returns nil on success, else the token of the live holder.
local current = redis.call('GET', KEYS[1])
if current and current ~= ARGV[1] and current ~= ARGV[5] then
  return current
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
redis.call('PUBLISH', KEYS[3], cjson.encode({event = 'joined', name = ARGV[3]}))
return false
