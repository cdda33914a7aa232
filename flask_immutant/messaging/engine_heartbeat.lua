-- A consumer's heartbeat: its record with a TTL, and its id in the consumers set (re-added if a
-- reaper removed it while the store was unreachable). Also notes, in store time, when beats last
-- came and since when they have come without a gap (an outage or a store restart breaks the run).
-- KEYS[1]: heartbeat key; KEYS[2]: SET of consumer ids; KEYS[3]: HASH last/since
-- ARGV[1]: consumer id; ARGV[2]: JSON record; ARGV[3]: TTL in ms
redis.call("set", KEYS[1], ARGV[2], "PX", ARGV[3])
redis.call("sadd", KEYS[2], ARGV[1])
local time = redis.call("time")
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local last = tonumber(redis.call("hget", KEYS[3], "last"))
if not last or now - last > tonumber(ARGV[3]) / 2 then
    redis.call("hset", KEYS[3], "since", now)
end
redis.call("hset", KEYS[3], "last", now)
return 1
