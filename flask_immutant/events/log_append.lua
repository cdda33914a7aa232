-- Append one event to the event log, never failing the caller's pipeline: a log key of another
-- type (garbage) must not undo the write the event records. KEYS: the stream.
-- ARGV: maxlen (0: not trimmed here), then field, value pairs. Returns the id, or false.
local command = {'XADD', KEYS[1]}
if tonumber(ARGV[1]) > 0 then
  command[#command + 1] = 'MAXLEN'
  command[#command + 1] = '~'
  command[#command + 1] = ARGV[1]
end
command[#command + 1] = '*'
for i = 2, #ARGV do
  command[#command + 1] = ARGV[i]
end
local reply = redis.pcall(unpack(command))
if type(reply) == 'table' and reply.err then
  return false
end
return reply
