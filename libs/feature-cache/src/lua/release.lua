-- Gives up a fill's reservation when the read found nothing to fill: if
-- KEYS[1] still holds reservation ARGV[1], the marker it replaced is put
-- back (same TTL), or the key is deleted when it replaced nothing.
local current = redis.call('GET', KEYS[1])
if not current then return 0 end
local version, rank, token =
  string.match(current, '^{"version":(%-?%d+),"rank":(%d),"reserved":"([^"]*)"}$')
if token ~= ARGV[1] then return 0 end
if version == '-1' then
  redis.call('DEL', KEYS[1])
  return 1
end
local marker = ',"fence":true}'
if rank == '2' then marker = ',"deleted":true}' end
redis.call('SET', KEYS[1], '{"version":' .. version .. marker, 'KEEPTTL')
return 1
