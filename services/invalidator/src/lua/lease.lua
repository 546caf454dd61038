-- Leadership lease with a fencing token. KEYS: lease key, token counter.
-- ARGV: action (acquire | renew | release | advance), holder prefix or
-- holder (advance: a token number), ms.
-- acquire returns the new holder value ('<prefix>:<token>') or false;
-- renew and release return 1 when this holder still held the lease;
-- advance moves the counter up to the number (never down) and returns 1.
local action = ARGV[1]
if action == 'advance' then
  if tonumber(redis.call('GET', KEYS[2]) or '0') < tonumber(ARGV[2]) then
    redis.call('SET', KEYS[2], ARGV[2])
  end
  return 1
end
if action == 'acquire' then
  if redis.call('EXISTS', KEYS[1]) == 1 then
    return false
  end
  local token = redis.call('INCR', KEYS[2])
  local holder = ARGV[2] .. ':' .. token
  redis.call('SET', KEYS[1], holder, 'PX', ARGV[3])
  return holder
end
if redis.call('GET', KEYS[1]) ~= ARGV[2] then
  return 0
end
if action == 'renew' then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
else
  redis.call('DEL', KEYS[1])
end
return 1
