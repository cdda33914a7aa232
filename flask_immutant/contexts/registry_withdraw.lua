-- Withdraw a context, but only the one this runtime published (a newer runtime of a redeploy
-- may have replaced it). KEYS: context, index set, changed channel. ARGV: runtime pid.
local current = redis.call('GET', KEYS[1])
if not current or tostring(cjson.decode(current).pid) ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], KEYS[1])
redis.call('PUBLISH', KEYS[3], KEYS[1])
return 1
