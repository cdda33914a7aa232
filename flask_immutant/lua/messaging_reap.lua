-- Requeue the unacknowledged messages of dead consumers, at the head of their queues.
-- A consumer is dead when its heartbeat key (TTL = failure timeout) is gone.
-- KEYS[1]: SET of consumer ids; KEYS[2]: SET of consumed Dramatiq queue names
-- ARGV[1]: Dramatiq namespace; ARGV[2]: heartbeat key prefix (id appended)
-- Returns a flat list: dead id, messages requeued, dead id, messages requeued...
local namespace = ARGV[1]
local prefix = ARGV[2]
local queues = redis.call("smembers", KEYS[2])
local result = {}
for _, id in ipairs(redis.call("smembers", KEYS[1])) do
    if redis.call("exists", prefix .. id) == 0 then
        local moved = 0
        for _, queue in ipairs(queues) do
            for _, name in ipairs({queue, queue .. ".DQ"}) do
                local acks = namespace .. ":__acks__." .. id .. "." .. name
                local messages = namespace .. ":" .. name .. ".msgs"
                for _, message_id in ipairs(redis.call("smembers", acks)) do
                    if redis.call("hexists", messages, message_id) == 1 then
                        redis.call("lpush", namespace .. ":" .. name, message_id)
                        moved = moved + 1
                    end
                end
                redis.call("del", acks)
            end
        end
        redis.call("zrem", namespace .. ":__heartbeats__", id)
        redis.call("srem", KEYS[1], id)
        table.insert(result, id)
        table.insert(result, moved)
    end
end
return result
