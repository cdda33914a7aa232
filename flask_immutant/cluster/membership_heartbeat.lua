-- Renew a node's claim. KEYS: claim, members hash, events channel. ARGV: token, ttl_ms, name, record.
-- Returns 1 renewed, 2 re-joined (the claim had expired, e.g. after a stall), 0 name taken by another.
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  if redis.call('HEXISTS', KEYS[2], ARGV[3]) == 0 then
    redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
  end
  return 1
end
if not current then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
  redis.call('PUBLISH', KEYS[3], cjson.encode({event = 'joined', name = ARGV[3]}))
  return 2
end
return 0
