-- Renew a lease we hold. KEYS: lease. ARGV: owner token, ttl_ms. Returns 1 renewed, 0 not ours.
local current = redis.call('GET', KEYS[1])
if current and cjson.decode(current).owner == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
