-- wrk script: POST /v1/recommend {"user_id": <random known user>, "k": 10}.
--   wrk -t1 -c64 -d15s -s benchmarks/wrk/recommend.lua http://127.0.0.1:8000 -- users.txt [k]
-- users.txt: one user id per line (benchmarks.serve writes it next to the artifacts).
-- The done() hook prints the latency percentiles and the non-2xx count on one line each.
local users = {}
local k = 10

function init(args)
  local path = args[1] or "users.txt"
  k = tonumber(args[2] or "10")
  for line in io.lines(path) do
    if #line > 0 then users[#users + 1] = line end
  end
  math.randomseed(12345)
end

function request()
  local user = users[math.random(#users)]
  local body = '{"user_id": "' .. user .. '", "k": ' .. k .. '}'
  return wrk.format("POST", "/v1/recommend", {["Content-Type"] = "application/json"}, body)
end

function done(summary, latency, requests)
  io.write(string.format("wrk-summary requests=%d seconds=%.3f non2xx=%d errors=%d\n",
    summary.requests, summary.duration / 1e6, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
  io.write(string.format("wrk-latency-ms p50=%.2f p90=%.2f p99=%.2f max=%.2f\n",
    latency:percentile(50) / 1000, latency:percentile(90) / 1000,
    latency:percentile(99) / 1000, latency.max / 1000))
end
