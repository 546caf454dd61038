-- Reads and writes: GET /api/features/{id}/ and, for a fraction of requests,
-- POST /api/features/ with a small features body, ids from a Zipf sample.
--   wrk ... -s bench/wrk/mixed.lua URL -- IDS_FILE WRITE_FRACTION
-- WRITE_FRACTION 0.05 is the 95/5 mix; 1.0 writes only.
-- done() (common.lua) prints one line "WRKJSON {...}" that bench.py parses
-- (the counts of reads and writes come from the service's /metrics).

local common = dofile(debug.getinfo(1, "S").source:match("^@(.*/)") .. "common.lua")
local ids, n = {}, 0
local write_fraction = 0.05
local post_headers = common.headers({ ["Content-Type"] = "application/json" })
local counter = 0

function init(args)
  ids, n = common.load_ids(args[1])
  write_fraction = tonumber(args[2]) or write_fraction
  math.randomseed(104729 * (thread_no or 1))
end

function request()
  local id = ids[math.random(n)]
  if math.random() < write_fraction then
    counter = counter + 1
    local body = string.format(
      '{"customer_id":"%s","features":{"credit_score":%d,"customer_segment":"premium",' ..
      '"utilization_rate":0.%03d,"bench_write":%d}}',
      id, 300 + math.random(550), math.random(999), counter)
    return wrk.format("POST", "/api/features/", post_headers, body)
  end
  return common.get(id)
end
