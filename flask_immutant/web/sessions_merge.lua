-- Per-key merge of one request's session changes (IMMUTANT_SESSION_MERGE): set the fields it
-- changed, delete the ones it removed, leave every other field as concurrent requests left it.
-- KEYS[1] session hash. ARGV[1] lifetime ms; ARGV[2] "1": only if the session still exists (it
-- was loaded, so its absence means it ended meanwhile: logout, regenerate, expiry);
-- ARGV[3] n; then n field/value pairs to set; then the fields to delete.
if ARGV[2] == '1' and redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local n = tonumber(ARGV[3])
if n > 0 then
  redis.call('HSET', KEYS[1], unpack(ARGV, 4, 3 + 2 * n))
end
if #ARGV >= 4 + 2 * n then
  redis.call('HDEL', KEYS[1], unpack(ARGV, 4 + 2 * n))
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
