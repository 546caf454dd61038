-- Appends changes to a partition's stream, publishes each with its stream
-- id and saves the change-feed position, atomically. Run behind the
-- writer's fence.
-- KEYS: stream, position key (one partition: one slot).
-- ARGV: [1] stream field, [2] channel, [3] MAXLEN, [4] position ('' to save
-- none), [5] the publish command (PUBLISH, or SPUBLISH for a cluster's
-- sharded channel, which hashes to the keys' slot), then per change three
-- values: the entry JSON and the pub/sub payload before and after its
-- stream id.
-- Returns the stream ids, in order.
local ids = {}
for i = 6, #ARGV - 2, 3 do
  local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', ARGV[1], ARGV[i])
  redis.call(ARGV[5], ARGV[2], ARGV[i + 1] .. id .. ARGV[i + 2])
  ids[#ids + 1] = id
end
if ARGV[4] ~= '' then
  redis.call('SET', KEYS[2], ARGV[4])
end
return ids
