-- Remove a member whose claim expired (a crashed node). Any node may call it; only the first
-- call for one death does anything. KEYS: claim, members hash, events channel. ARGV: name.
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('HEXISTS', KEYS[2], ARGV[1]) == 0 then
  return 0
end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('PUBLISH', KEYS[3], cjson.encode({event = 'left', name = ARGV[1], reason = 'timeout'}))
return 1
