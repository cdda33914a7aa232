-- Write a daemon's status record unless it would overwrite a newer holder's.
-- A write with a fencing token older than the stored one is stale (a holder that was paused past its
-- lease); a write without one (stopped, per-node) may only replace a record of the same process.
-- KEYS[1]: HASH of daemon records. ARGV: field, JSON record, fencing token ("" if none), owner (node:pid).
-- Returns 1 written, 0 refused.
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current then
  local ok, old = pcall(cjson.decode, current)
  if ok and type(old) == 'table' then
    local old_fence = tonumber(old.fencing_token)
    local fence = tonumber(ARGV[3])
    local old_owner = tostring(old.node) .. ':' .. tostring(old.pid)
    if old_fence and ((fence and fence < old_fence) or (not fence and old_owner ~= ARGV[4])) then
      return 0
    end
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
