-- Acknowledge a batch of handled messages in one call: for each id, Dramatiq's own "ack"
-- (dispatch.lua): the id leaves the consumer's ack set and, only if it was still there (a reaper
-- may have given the message to another consumer meanwhile), its data leaves the queue's hash.
-- A key of another type (garbage a store writer put there) is left alone: the next fetch reports
-- it. A store refusing writes (NOREPLICAS, READONLY, OOM) fails the call: the ids are kept.
-- KEYS[1]: the consumer's ack set ({namespace}:__acks__.{broker id}.{queue}, a SET)
-- KEYS[2]: the queue's messages ({namespace}:{queue}.msgs, a HASH)
-- ARGV: the broker's ids of the messages. Returns how many were still unacknowledged.
if redis.call("type", KEYS[1])["ok"] ~= "set" then
    return 0
end
local hashed = redis.call("type", KEYS[2])["ok"] == "hash"
local acked = 0
for _, id in ipairs(ARGV) do
    if redis.call("srem", KEYS[1], id) == 1 then
        if hashed then
            redis.call("hdel", KEYS[2], id)
        end
        acked = acked + 1
    end
end
return acked
