-- The fence, checked before a fenced script's own body runs: the script's
-- last key must hold its last argument (the writer's token). The body keeps
-- its own KEYS and ARGV numbering.
if redis.call('GET', KEYS[#KEYS]) ~= ARGV[#ARGV] then
  return redis.error_reply('FENCED the fence key no longer holds this writer token')
end
