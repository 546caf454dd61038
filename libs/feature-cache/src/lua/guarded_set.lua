-- The version guard, atomically: store ARGV[3] under KEYS[1] (for ARGV[4] ms)
-- only if (version, rank) = (ARGV[1], ARGV[2]) is strictly greater than what
-- the key holds. Ranks at one version: fence 0 < document 1 < tombstone 2.
-- Returns 1 when stored, 2 when the key already holds this very (version,
-- rank), 0 when refused because it holds something newer.
local current = redis.call('GET', KEYS[1])
if current then
  local version, rest = string.match(current, '^{"version":(%-?%d+)(.*)$')
  local rank = 1
  if version then
    if rest == ',"deleted":true}' then
      rank = 2
    elseif rest == ',"fence":true}' then
      rank = 0
    end
  else
    -- Not written by us in the usual layout: decode it the slow way.
    local ok, value = pcall(cjson.decode, current)
    if ok and type(value) == 'table' and tonumber(value.version) then
      version = value.version
      if value.deleted == true then rank = 2 elseif value.fence == true then rank = 0 end
    end
  end
  version = tonumber(version)
  if version then
    local new_version = tonumber(ARGV[1])
    local new_rank = tonumber(ARGV[2])
    if new_version == version and new_rank == rank then
      return 2
    end
    if new_version < version or (new_version == version and new_rank < rank) then
      return 0
    end
  end
end
redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
return 1
