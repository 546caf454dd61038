-- GET /api/features/{id}/ with ids drawn from a precomputed Zipf sample.
--   wrk ... -s bench/wrk/zipf_get.lua URL -- IDS_FILE
-- IDS_FILE (written by `bench.py zipf`) holds one customer id per line, each
-- line one draw from the Zipf distribution; every request picks a random line.
-- done() (common.lua) prints one line "WRKJSON {...}" that bench.py parses.

local common = dofile(debug.getinfo(1, "S").source:match("^@(.*/)") .. "common.lua")
local ids, n = {}, 0

function init(args)
  ids, n = common.load_ids(args[1])
  math.randomseed(7919 * (thread_no or 1))
end

function request()
  return common.get(ids[math.random(n)])
end
