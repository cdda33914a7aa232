-- Publish messages (one, or a publish_many batch), each to one or more Dramatiq queues (a queue,
-- or every subscription of a topic), dropping a message whose idempotency key was seen within
-- the window. All in one call: a batch is written whole and in order.
-- KEYS: the idempotency markers of the messages that have a key, in order
-- ARGV: namespace, then per message: "<dedupe ttl ms (0: no key)> <number of targets>", then per
-- target: "<front 1/0><message id> <queue>" and the data (few arguments: packing them is the cost)
-- Messages put in front (priority above normal) keep their batch order there too. Each message
-- also leaves a token on its queue's wake list, where idle consumers wait (BLPOP): Redis hands it
-- to the one that has waited longest. The list is capped (tokens only wake).
-- Returns per message -1 for a duplicate, else the number of queues written.
local namespace = ARGV[1]
local results = {}
local fronts, front_queues = {}, {}
local wakes, wake_queues = {}, {}
local i, k, m = 2, 0, 0
while i <= #ARGV do
    local ttl, count = string.match(ARGV[i], "^(%d+) (%d+)$")
    ttl, count = tonumber(ttl), tonumber(count)
    i = i + 1
    m = m + 1
    local fresh = true
    if ttl > 0 then
        k = k + 1
        fresh = redis.call("set", KEYS[k], "1", "NX", "PX", ttl)
    end
    if not fresh then
        results[m] = -1
    else
        for j = i, i + 2 * (count - 1), 2 do
            local front, id, name = string.match(ARGV[j], "^(%d)(%S+) (.+)$")
            local queue = namespace .. ":" .. name
            redis.call("hset", queue .. ".msgs", id, ARGV[j + 1])
            if front == "1" then
                if not fronts[queue] then
                    fronts[queue] = {}
                    front_queues[#front_queues + 1] = queue
                end
                table.insert(fronts[queue], id)
            else
                redis.call("rpush", queue, id)
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
    i = i + 2 * count
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
    -- pcall: tokens only wake; a wake key of another type must not fail the publish (its error
    -- reply is a table, not a length). Trimmed only once past the cap: one command less per publish.
    local length = redis.pcall("rpush", queue .. ".wake", unpack(tokens))
    if type(length) == "number" and length > 64 then
        redis.pcall("ltrim", queue .. ".wake", -64, -1)
    end
end
return results
