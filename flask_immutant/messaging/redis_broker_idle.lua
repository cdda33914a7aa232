-- A consumer whose fetch left its queue empty is about to wait for a wake token. While the queue
-- is empty every token on its wake list belongs to a message some consumer has already fetched (a
-- publish writes its message before its token, in one script), so they go: else the consumer
-- would wake once for each and fetch nothing. When messages wait, the tokens stay and the
-- consumer fetches again instead of waiting.
-- KEYS[1]: Dramatiq's queue (a LIST of message ids); KEYS[2]: the queue's wake list
-- Returns the number of messages waiting (1 when the queue key holds another type: the fetch
-- reports that, not this script).
local waiting = redis.pcall("llen", KEYS[1])
if type(waiting) ~= "number" then
    return 1
end
if waiting == 0 then
    redis.call("del", KEYS[2])
end
return waiting
