-- A consumer's heartbeat: its record with a TTL, and its id in the consumers set (re-added if a
-- reaper removed it while the store was unreachable).
-- KEYS[1]: heartbeat key; KEYS[2]: SET of consumer ids
-- ARGV[1]: consumer id; ARGV[2]: JSON record; ARGV[3]: TTL in ms
redis.call("set", KEYS[1], ARGV[2], "PX", ARGV[3])
redis.call("sadd", KEYS[2], ARGV[1])
return 1
