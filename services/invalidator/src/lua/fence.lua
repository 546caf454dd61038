-- Fencing: only the current lease holder may write. KEYS[2] is the lease key,
-- ARGV[5] the holder value this process got when it acquired the lease.
if redis.call('GET', KEYS[2]) ~= ARGV[5] then
  return redis.error_reply('FENCED not the lease holder')
end
