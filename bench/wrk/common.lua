-- Shared by the wrk scripts (loaded with dofile from the script's folder):
-- thread numbering in setup(), the Zipf id sample, cached GET requests, and
-- done(), which prints one line "WRKJSON {...}" that bench.py parses.

local common = {}
local thread_count = 0
local cache = {}

function setup(thread)
  thread_count = thread_count + 1
  thread:set("thread_no", thread_count)
end

-- The ids of IDS_FILE (written by `bench.py zipf`), one draw per line.
function common.load_ids(path)
  local ids, n = {}, 0
  for line in io.lines(path) do
    n = n + 1
    ids[n] = line
  end
  return ids, n
end

-- Authorization: Bearer $CACHE_API_KEY when the variable is set (a service
-- without credentials configured ignores it); nil keeps wrk's own headers.
local api_key = os.getenv("CACHE_API_KEY")
function common.headers(extra)
  local headers = {}
  for k, v in pairs(wrk.headers) do headers[k] = v end
  for k, v in pairs(extra or {}) do headers[k] = v end
  if api_key ~= nil and api_key ~= "" then
    headers["Authorization"] = "Bearer " .. api_key
  end
  return headers
end

-- GET /api/features/{id}/, formatted once per id.
function common.get(id)
  local req = cache[id]
  if req == nil then
    req = wrk.format("GET", "/api/features/" .. id .. "/", common.headers())
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

return common
