-- Adds read counts to the hot-key record KEYS[1], a sorted set of customer
-- id -> decayed read score. ARGV[1]: the half-life in ms; ARGV[2]: how many
-- members to keep; ARGV[3..]: pairs of customer id and reads.
--
-- Forward decay: reads at time t add reads * 2^((t - L) / half-life), L the
-- landmark. Scores are then proportional to reads decayed to any common
-- moment, so their order is the order of the decayed counts, and nothing has
-- to be rewritten as time passes. Once the weights reach 2^RESCALE, every
-- score is multiplied by 2^-(t - L) / half-life and L moves to t (the order
-- stays). L is kept in the set itself, as the member '#landmark' with score
-- -L: below every count, and no customer id contains '#'. Time is Redis's
-- own clock, the same for every replica.
local MARK = '#landmark'
local RESCALE = 20
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local half_life = tonumber(ARGV[1])
local keep = tonumber(ARGV[2])
local landmark = now
local mark = redis.call('ZSCORE', KEYS[1], MARK)
if mark then landmark = -tonumber(mark) end
local age = (now - landmark) / half_life
if age > RESCALE or age < 0 then
  redis.call('ZUNIONSTORE', KEYS[1], 1, KEYS[1], 'WEIGHTS', string.format('%.17g', 2 ^ (-age)))
  landmark = now
  age = 0
end
local weight = 2 ^ age
for i = 3, #ARGV - 1, 2 do
  redis.call('ZINCRBY', KEYS[1], string.format('%.17g', tonumber(ARGV[i + 1]) * weight), ARGV[i])
end
redis.call('ZREM', KEYS[1], MARK)
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -(keep + 1))
redis.call('ZADD', KEYS[1], -landmark, MARK)
return landmark
