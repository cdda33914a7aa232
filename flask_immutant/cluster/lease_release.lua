-- Release a lease we hold (compare-and-delete) and wake contenders.
-- KEYS: lease, released channel, last holder (deleted: a release is no failover).
-- ARGV: owner token, lease name. Returns 1 released, 0 not ours.
local current = redis.call('GET', KEYS[1])
if current and cjson.decode(current).owner == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('DEL', KEYS[3])
  redis.call('PUBLISH', KEYS[2], ARGV[2])
  return 1
end
return 0
