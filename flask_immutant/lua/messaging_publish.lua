-- Publish messages (one, or a publish_many batch), each to one or more Dramatiq queues (a queue,
-- or every subscription of a topic), dropping a message whose idempotency key was seen within
-- the window. All in one call: a batch is written whole and in order.
-- KEYS[m]: message m's idempotency key's marker (any key when it has none)
-- ARGV: namespace, then per message: dedupe_ttl_ms (0: no key), number of targets, then per
-- target: queue, message id, data, front (1/0)
-- Messages put in front (priority above normal) keep their batch order there too. Each message
-- also leaves a token on its queue's wake list, where idle consumers wait (BLPOP): Redis hands it
-- to the one that has waited longest. The list is capped (tokens only wake).
-- Returns per message -1 for a duplicate, else the number of queues written.
local namespace = ARGV[1]
local results = {}
local fronts, front_queues = {}, {}
local wakes, wake_queues = {}, {}
local i = 2
for m = 1, #KEYS do
    local ttl = tonumber(ARGV[i])
    local count = tonumber(ARGV[i + 1])
    i = i + 2
    if ttl > 0 and not redis.call("set", KEYS[m], "1", "NX", "PX", ttl) then
        results[m] = -1
    else
        for j = i, i + 4 * (count - 1), 4 do
            local queue = namespace .. ":" .. ARGV[j]
            redis.call("hset", queue .. ".msgs", ARGV[j + 1], ARGV[j + 2])
            if ARGV[j + 3] == "1" then
                if not fronts[queue] then
                    fronts[queue] = {}
                    front_queues[#front_queues + 1] = queue
                end
                table.insert(fronts[queue], ARGV[j + 1])
            else
                redis.call("rpush", queue, ARGV[j + 1])
            end
            if string.sub(queue, -3) ~= ".DQ" then
                if not wakes[queue] then
                    wakes[queue] = 0
                    wake_queues[#wake_queues + 1] = queue
                end
                wakes[queue] = wakes[queue] + 1
            end
        end
        results[m] = count
    end
    i = i + 4 * count
end
for _, queue in ipairs(front_queues) do
    local ids = fronts[queue]
    for j = #ids, 1, -1 do
        redis.call("lpush", queue, ids[j])
    end
end
for _, queue in ipairs(wake_queues) do
    local tokens = {}
    for j = 1, math.min(wakes[queue], 64) do
        tokens[j] = "1"
    end
    redis.call("rpush", queue .. ".wake", unpack(tokens))
    redis.call("ltrim", queue .. ".wake", -64, -1)
end
return results
