-- Claim one due time of a singleton job, exactly once across the cluster.
-- KEYS: schedule zset, job state hash. ARGV: job id, due (the score read), next due ('' = done),
-- node, fire (1 = run it, 0 = a skipped misfire), limit (0 = none), now.
-- Returns 1 fire, 2 advanced without firing, 0 someone else claimed it (or it is gone).
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or math.abs(tonumber(score) - tonumber(ARGV[2])) > 0.0005 then
  return 0
end
local limit = tonumber(ARGV[6])
local fired = tonumber(redis.call('HGET', KEYS[2], 'fired') or '0')
if limit > 0 and fired >= limit then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 0
end
if ARGV[5] == '1' then
  fired = redis.call('HINCRBY', KEYS[2], 'fired', 1)
  redis.call('HSET', KEYS[2], 'last_due', ARGV[2], 'last_fired_at', ARGV[7], 'last_node', ARGV[4])
end
if ARGV[3] == '' or (limit > 0 and fired >= limit) then
  redis.call('ZREM', KEYS[1], ARGV[1])
else
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
end
if ARGV[5] == '1' then
  return 1
end
return 2
