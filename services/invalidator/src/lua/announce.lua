-- Appends a change to the stream, publishes it with its stream id, and saves
-- the resume token, atomically. KEYS: stream, lease, token key.
-- ARGV: message JSON ('' to only save the token), channel, MAXLEN, token,
-- holder. Returns the stream id ('' when only the token was saved).
if redis.call('GET', KEYS[2]) ~= ARGV[5] then
  return redis.error_reply('FENCED not the lease holder')
end
local id = ''
if ARGV[1] ~= '' then
  id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'message', ARGV[1])
  redis.call('PUBLISH', ARGV[2], string.sub(ARGV[1], 1, -2) .. ',"stream_id":"' .. id .. '"}')
end
redis.call('SET', KEYS[3], ARGV[4])
return id
