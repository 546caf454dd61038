-- The order of what a key holds, shared by the scripts that compare it.
-- Versions are decimal strings compared exactly (Lua numbers are doubles).

local function compare(a, b)
  local a_neg, b_neg = a:sub(1, 1) == '-', b:sub(1, 1) == '-'
  if a_neg ~= b_neg then return a_neg and -1 or 1 end
  local sign = a_neg and -1 or 1
  if a_neg then a, b = a:sub(2), b:sub(2) end
  if #a ~= #b then return (#a < #b and -1 or 1) * sign end
  if a == b then return 0 end
  return (a < b and -1 or 1) * sign
end

-- The order of a stored value: version (string), rank, reservation token,
-- and whether it is a cached absence.
-- Ranks at one version: floor 0 = absence 0 < document 1 < tombstone 2.
local function order_of(value)
  local version, rest = string.match(value, '^{"version":(%-?%d+)(.*)$')
  if not version then return nil end
  if rest == ',"deleted":true}' then return version, 2, nil, false end
  if rest == ',"fence":true}' then return version, 0, nil, false end
  if rest == ',"absent":true}' then return version, 0, nil, true end
  local rank, token = string.match(rest, '^,"rank":(%d),"reserved":"([^"]*)"}$')
  if rank then return version, tonumber(rank), token, false end
  return version, 1, nil, false
end

-- What the key holds, unless its version is beyond `horizon` (further
-- ahead than MongoDB could have given: forged): then nothing.
local function held(key, horizon)
  local current = redis.call('GET', key)
  if not current then return nil end
  local version, rank, token, absent = order_of(current)
  if version and compare(version, horizon) > 0 then return nil end
  return current, version, rank, token, absent
end
