-- Release a lease held by ARGV[1] (compare-and-delete) and wake contenders.
-- KEYS: lease, released channel, last holder (deleted: a release is no failover).
-- ARGV: owner token, lease name, and "dead" when the holder is released on its behalf because it
-- was proven dead: the last-holder key stays, so the next acquisition is reported as a failover.
-- Returns 1 released, 0 not held by that owner.
local current = redis.call('GET', KEYS[1])
if current and cjson.decode(current).owner == ARGV[1] then
  redis.call('DEL', KEYS[1])
  if ARGV[3] ~= 'dead' then
    redis.call('DEL', KEYS[3])
  end
  redis.call('PUBLISH', KEYS[2], ARGV[2])
  return 1
end
return 0
