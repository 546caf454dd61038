-- Reserves KEYS[1] for a fill that is about to read MongoDB. Returns
--   {'document', value}  the key holds a document (the caller may serve it);
--   {'reserved', token}  the key now holds a reservation: ARGV[1], or the
--                        token of a reservation already there (fillers
--                        share it: each began after it was made).
-- Any later write, delete, flush or eviction replaces or removes the
-- reservation, and a fill is accepted only onto its own reservation
-- (guarded_set.lua), so a fill never lands after a change it did not see.
-- A reservation keeps the order of a marker it replaces, so ordered writers
-- are still compared with it. ARGV[2]: its TTL in ms.
local current = redis.call('GET', KEYS[1])
local version, rank = '-1', 0
if current then
  local v, rest = string.match(current, '^{"version":(%-?%d+)(.*)$')
  if v then
    local token = string.match(rest, '^,"rank":%d,"reserved":"([^"]*)"}$')
    if token then return {'reserved', token} end
    if rest == ',"deleted":true}' then
      version, rank = v, 2
    elseif rest == ',"fence":true}' then
      version, rank = v, 0
    else
      return {'document', current}
    end
  end
end
redis.call('SET', KEYS[1],
  '{"version":' .. version .. ',"rank":' .. rank .. ',"reserved":"' .. ARGV[1] .. '"}',
  'PX', ARGV[2])
return {'reserved', ARGV[1]}
