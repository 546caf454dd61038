-- Reserves KEYS[1] for a fill that is about to read MongoDB. Returns
--   {'document', value}  the key holds a document (the caller may serve it);
--   {'absent', value}    (reads only) the key holds a cached absence, or
--                        (ARGV[4] 'negative') a tombstone;
--   {'reserved', token, version, placed}
--                        the key now holds a reservation keeping the order
--                        `version` (the marker it replaced, '-1' for none):
--                        placed '1', ARGV[1] is new and its caller leads the
--                        read; placed '0', another's reservation was there
--                        and its token is shared (the caller began after it
--                        was made, so any fill onto it is as safe as the
--                        leader's).
-- Any later write, delete, flush or eviction replaces or removes the
-- reservation, and a fill is accepted only onto its own reservation
-- (guarded_set.lua), so a fill never lands after a change it did not see.
-- A reservation keeps the order of a marker it replaces, so ordered writers
-- are still compared with it; an entry beyond the horizon ARGV[3] (forged)
-- is replaced like an absent key. ARGV[2]: the reservation's TTL in ms.
-- ARGV[4]: 'read', 'negative' (a read that serves absences: tombstones
-- too) or 'write'; a write replaces a cached absence like any marker (its
-- fill must land whatever the absence's order).
local current, version, rank, token, absent = held(KEYS[1], ARGV[3])
local keep_version, keep_rank = '-1', 0
if current and version then
  if token then return {'reserved', token, version, '0'} end
  if rank == 1 then return {'document', current} end
  if ARGV[4] ~= 'write' and (absent or (rank == 2 and ARGV[4] == 'negative')) then
    return {'absent', current}
  end
  keep_version, keep_rank = version, rank
end
redis.call('SET', KEYS[1],
  '{"version":' .. keep_version .. ',"rank":' .. keep_rank .. ',"reserved":"' .. ARGV[1] .. '"}',
  'PX', ARGV[2])
return {'reserved', ARGV[1], keep_version, '1'}
