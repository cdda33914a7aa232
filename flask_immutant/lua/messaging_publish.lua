-- Publish one message to one or more Dramatiq queues at once (a queue, or every subscription of
-- a topic), dropping it if its idempotency key was seen within the window.
-- KEYS[1]: the idempotency key's marker (any key when there is none)
-- ARGV: dedupe_ttl_ms (0: no key), namespace, then per target: queue, message id, data, front (1/0)
-- Each message also leaves a token on the queue's wake list, where idle consumers wait (BLPOP):
-- Redis hands it to the one that has waited longest. The list is capped (tokens only wake).
-- Returns -1 for a duplicate, else the number of queues written.
local ttl = tonumber(ARGV[1])
if ttl > 0 then
    if not redis.call("set", KEYS[1], "1", "NX", "PX", ttl) then
        return -1
    end
end
local namespace = ARGV[2]
local written = 0
for i = 3, #ARGV, 4 do
    local queue = namespace .. ":" .. ARGV[i]
    redis.call("hset", queue .. ".msgs", ARGV[i + 1], ARGV[i + 2])
    if ARGV[i + 3] == "1" then
        redis.call("lpush", queue, ARGV[i + 1])
    else
        redis.call("rpush", queue, ARGV[i + 1])
    end
    if string.sub(queue, -3) ~= ".DQ" then
        -- pcall: tokens only wake; a wake key of another type must not fail the publish
        redis.pcall("rpush", queue .. ".wake", "1")
        redis.pcall("ltrim", queue .. ".wake", -64, -1)
    end
    written = written + 1
end
return written
