-- The version guard, atomically: store ARGV[3] under KEYS[1] (for ARGV[4] ms)
-- only if (version, rank) = (ARGV[1], ARGV[2]) is strictly greater than the
-- order of what the key holds. ARGV[5] says who writes:
--   ''      an ordered writer (the invalidator, a delete): the guard alone;
--   '*'     a writer that found a document when it began: the guard, and an
--           absent key or a reservation refuses (something happened since);
--   '+'     a refresh ahead of expiry: as '*', and when the key holds this
--           very (version, rank) its TTL is set to ARGV[4] (PEXPIRE);
--   token   a filler that reserved the key when it began: its own
--           reservation is replaced; an absent key or another reservation
--           refuses, anything else goes through the guard.
-- ARGV[6]: the horizon; an entry beyond it counts as absent (forged).
-- Returns {1} stored, {2} the key holds this very (version, rank),
-- {0, version} refused: the key holds something newer (at that version),
-- {3} refused: the reservation is gone.
local writer = ARGV[5]
local current, version, rank, token = held(KEYS[1], ARGV[6])
if not current then
  if writer ~= '' then return {3} end
else
  if token and writer ~= '' then
    if token ~= writer then return {3} end
    redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
    return {1}
  end
  if version then
    local new_rank = tonumber(ARGV[2])
    local by_version = compare(ARGV[1], version)
    if by_version == 0 and new_rank == rank then
      if writer == '+' then redis.call('PEXPIRE', KEYS[1], ARGV[4]) end
      return {2}
    end
    if by_version < 0 or (by_version == 0 and new_rank < rank) then return {0, version} end
  end
end
redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
return {1}
