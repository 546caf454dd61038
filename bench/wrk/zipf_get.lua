-- GET /api/features/{id}/ with ids drawn from a precomputed Zipf sample.
--   wrk ... -s bench/wrk/zipf_get.lua URL -- IDS_FILE
-- IDS_FILE (written by `bench.py zipf`) holds one customer id per line, each
-- line one draw from the Zipf distribution; every request picks a random line.
-- done() prints one line "WRKJSON {...}" that bench.py parses.

local ids, n, cache = {}, 0, {}
local thread_count = 0

function setup(thread)
  thread_count = thread_count + 1
  thread:set("thread_no", thread_count)
end

function init(args)
  for line in io.lines(args[1]) do
    n = n + 1
    ids[n] = line
  end
  math.randomseed(7919 * (thread_no or 1))
end

function request()
  local id = ids[math.random(n)]
  local req = cache[id]
  if req == nil then
    req = wrk.format("GET", "/api/features/" .. id .. "/")
    cache[id] = req
  end
  return req
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"mean":%.1f,"stdev":%.1f,"min":%d,"max":%d,' ..
    '"p50":%d,"p75":%d,"p90":%d,"p99":%d,"p99.9":%d}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.stdev, latency.min, latency.max,
    latency:percentile(50), latency:percentile(75), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9)))
end
