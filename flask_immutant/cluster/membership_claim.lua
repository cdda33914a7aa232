-- Claim a node name and join: the claim key holds the owner token with a TTL of the failure
-- timeout. KEYS: claim, members hash, events channel. ARGV: token, ttl_ms, name, record, replace.
-- ARGV[5] is a token the caller proved dead (its lock file abandoned); it may be replaced at once.
-- Returns nil on success, the token of the live holder if the name is taken, or {1} on success
-- over a predecessor that never left (killed: its claim expired unreaped, or proven dead), whose
-- departure is then announced here: a node restarted quickly would otherwise hide the crash.
local current = redis.call('GET', KEYS[1])
if current and current ~= ARGV[1] and current ~= ARGV[5] then
  return current
end
local crashed = (current and current == ARGV[5]) or (not current and redis.call('HEXISTS', KEYS[2], ARGV[3]) == 1)
if crashed then
  redis.call('PUBLISH', KEYS[3], cjson.encode({event = 'left', name = ARGV[3], reason = 'timeout'}))
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
redis.call('PUBLISH', KEYS[3], cjson.encode({event = 'joined', name = ARGV[3]}))
if crashed then
  return {1}
end
return false
