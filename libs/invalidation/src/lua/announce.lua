-- Appends a change to the stream, publishes it with its stream id and saves
-- the change-feed position, atomically. Run behind the writer's fence.
-- KEYS: stream, position key (one partition: one slot).
-- ARGV: stream field, entry JSON ('' to only save the position), channel,
-- MAXLEN, position, pub/sub payload before and after the stream id, and
-- the publish command (PUBLISH, or SPUBLISH for a cluster's sharded
-- channel, which hashes to the keys' slot).
-- Returns the stream id ('' when only the position was saved).
local id = ''
if ARGV[2] ~= '' then
  id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[4], '*', ARGV[1], ARGV[2])
  redis.call(ARGV[8], ARGV[3], ARGV[6] .. id .. ARGV[7])
end
redis.call('SET', KEYS[2], ARGV[5])
return id
