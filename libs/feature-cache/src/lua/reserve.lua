-- Reserves KEYS[1] for a fill that is about to read MongoDB. Returns
--   {'document', value}  the key holds a document (the caller may serve it);
--   {'reserved', token}  the key now holds a reservation: ARGV[1], or the
--                        token of a reservation already there (fillers
--                        share it: each began after it was made).
-- Any later write, delete, flush or eviction replaces or removes the
-- reservation, and a fill is accepted only onto its own reservation
-- (guarded_set.lua), so a fill never lands after a change it did not see.
-- A reservation keeps the order of a marker it replaces, so ordered writers
-- are still compared with it; an entry beyond the horizon ARGV[3] (forged)
-- is replaced like an absent key. ARGV[2]: the reservation's TTL in ms.
local current, version, rank, token = held(KEYS[1], ARGV[3])
local keep_version, keep_rank = '-1', 0
if current and version then
  if token then return {'reserved', token} end
  if rank == 1 then return {'document', current} end
  keep_version, keep_rank = version, rank
end
redis.call('SET', KEYS[1],
  '{"version":' .. keep_version .. ',"rank":' .. keep_rank .. ',"reserved":"' .. ARGV[1] .. '"}',
  'PX', ARGV[2])
return {'reserved', ARGV[1]}
