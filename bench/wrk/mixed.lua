-- Reads and writes: GET /api/features/{id}/ and, for a fraction of requests,
-- POST /api/features/ with a small features body, ids from a Zipf sample.
--   wrk ... -s bench/wrk/mixed.lua URL -- IDS_FILE WRITE_FRACTION
-- WRITE_FRACTION 0.05 is the 95/5 mix; 1.0 writes only.
-- done() prints one line "WRKJSON {...}" that bench.py parses (the counts of
-- reads and writes come from the service's /metrics, not from here).

local ids, n, cache = {}, 0, {}
local write_fraction = 0.05
local thread_count = 0
local post_headers = { ["Content-Type"] = "application/json" }
local counter = 0

function setup(thread)
  thread_count = thread_count + 1
  thread:set("thread_no", thread_count)
end

function init(args)
  for line in io.lines(args[1]) do
    n = n + 1
    ids[n] = line
  end
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
