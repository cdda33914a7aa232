-- Requeue the unacknowledged messages of dead consumers, at the head of their queues.
-- A consumer is dead when its heartbeat key (TTL = failure timeout) is gone, judged only once
-- beats have come without a gap for a whole failure timeout: right after an outage or a store
-- restart every heartbeat may have expired, the living's too, and they must not be robbed.
-- KEYS[1]: SET of consumer ids; KEYS[2]: SET of consumed Dramatiq queue names; KEYS[3]: HASH last/since
-- ARGV[1]: Dramatiq namespace; ARGV[2]: heartbeat key prefix (id appended); ARGV[3]: failure timeout ms
-- ARGV[4] (optional): only this consumer, which is leaving (no waiting for a run of beats)
-- Returns a flat list: dead id, messages requeued, {queue, requeued, queue, requeued...}, dead id, ...
local namespace = ARGV[1]
local prefix = ARGV[2]
local result = {}
local time = redis.call("time")
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local last = tonumber(redis.call("hget", KEYS[3], "last"))
local since = tonumber(redis.call("hget", KEYS[3], "since"))
local leaving = ARGV[4]
if not leaving and (not last or not since or now - last > tonumber(ARGV[3]) / 2
                    or now - since < tonumber(ARGV[3])) then
    return result
end
local queues = redis.call("smembers", KEYS[2])
local candidates = leaving and {leaving} or redis.call("smembers", KEYS[1])
for _, id in ipairs(candidates) do
    if redis.call("exists", prefix .. id) == 0 then
        local moved = 0
        local per_queue = {}
        for _, queue in ipairs(queues) do
            local moved_here = 0
            for _, name in ipairs({queue, queue .. ".DQ"}) do
                local acks = namespace .. ":__acks__." .. id .. "." .. name
                local messages = namespace .. ":" .. name .. ".msgs"
                for _, message_id in ipairs(redis.call("smembers", acks)) do
                    if redis.call("hexists", messages, message_id) == 1 then
                        redis.call("lpush", namespace .. ":" .. name, message_id)
                        if name == queue then  -- wake an idle consumer (see messaging_publish.lua)
                            redis.pcall("rpush", namespace .. ":" .. name .. ".wake", "1")  -- tokens only wake
                            redis.pcall("ltrim", namespace .. ":" .. name .. ".wake", -64, -1)
                        end
                        moved = moved + 1
                        moved_here = moved_here + 1
                    end
                end
                redis.call("del", acks)
            end
            if moved_here > 0 then
                table.insert(per_queue, queue)
                table.insert(per_queue, moved_here)
            end
        end
        redis.call("zrem", namespace .. ":__heartbeats__", id)
        redis.call("srem", KEYS[1], id)
        table.insert(result, id)
        table.insert(result, moved)
        table.insert(result, per_queue)
    end
end
return result
