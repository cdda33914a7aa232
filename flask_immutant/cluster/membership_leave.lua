-- Graceful leave, compare-and-delete. KEYS: claim, members hash, events channel. ARGV: token, name.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('HDEL', KEYS[2], ARGV[2])
redis.call('PUBLISH', KEYS[3], cjson.encode({event = 'left', name = ARGV[2], reason = 'left'}))
return 1
