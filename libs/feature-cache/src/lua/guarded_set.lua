-- The version guard, atomically: store ARGV[3] under KEYS[1] (for ARGV[4] ms)
-- only if (version, rank) = (ARGV[1], ARGV[2]) is strictly greater than the
-- order of what the key holds. Ranks at one version: floor 0 < document 1 <
-- tombstone 2. ARGV[5] says who writes:
--   ''      an ordered writer (the invalidator, a delete): the guard alone;
--   '*'     a writer that found a document when it began: the guard, and an
--           absent key or a reservation refuses (something happened since);
--   token   a filler that reserved the key when it began: its own
--           reservation is replaced; an absent key or another reservation
--           refuses, anything else goes through the guard.
-- Returns {1} stored, {2} the key holds this very (version, rank),
-- {0, version} refused: the key holds something newer (at that version),
-- {3} refused: the reservation is gone.
-- Versions are compared as decimal strings, exactly (Lua numbers are doubles).

local function compare(a, b)
  local a_neg, b_neg = a:sub(1, 1) == '-', b:sub(1, 1) == '-'
  if a_neg ~= b_neg then return a_neg and -1 or 1 end
  local sign = a_neg and -1 or 1
  if a_neg then a, b = a:sub(2), b:sub(2) end
  if #a ~= #b then return (#a < #b and -1 or 1) * sign end
  if a == b then return 0 end
  return (a < b and -1 or 1) * sign
end

-- The order of a stored value: version (string), rank, reservation token.
local function order_of(value)
  local version, rest = string.match(value, '^{"version":(%-?%d+)(.*)$')
  if not version then return nil end
  if rest == ',"deleted":true}' then return version, 2, nil end
  if rest == ',"fence":true}' then return version, 0, nil end
  local rank, token = string.match(rest, '^,"rank":(%d),"reserved":"([^"]*)"}$')
  if rank then return version, tonumber(rank), token end
  return version, 1, nil
end

local writer = ARGV[5]
local current = redis.call('GET', KEYS[1])
if not current then
  if writer ~= '' then return {3} end
else
  local version, rank, token = order_of(current)
  if token and writer ~= '' then
    if token ~= writer then return {3} end
    redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
    return {1}
  end
  if version then
    local new_rank = tonumber(ARGV[2])
    local by_version = compare(ARGV[1], version)
    if by_version == 0 and new_rank == rank then return {2} end
    if by_version < 0 or (by_version == 0 and new_rank < rank) then return {0, version} end
  end
end
redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
return {1}
