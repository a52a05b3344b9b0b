-- wrk's script for the benchmark: POST the given files round-robin, then print one JSON line.
-- wrk -t T -c C -d Ds --timeout 120s -s benchmarks/post.lua URL -- CONTENT_TYPE FILE [FILE ...]
local requests, turn = {}, 0

function init(args)
  for i = 2, #args do
    local file = assert(io.open(args[i], "rb"))
    local body = file:read("*a")
    file:close()
    requests[#requests + 1] = wrk.format("POST", nil, {["Content-Type"] = args[1]}, body)
  end
end

function request()
  turn = turn % #requests + 1
  return requests[turn]
end

function done(summary, latency, _)
  local e = summary.errors
  -- requests: answers received (status: those that were not 2xx/3xx); the others are socket errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "status_errors": %d, "socket_errors": %d, '
    .. '"p50_us": %d, "p95_us": %d, "p99_us": %d}\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99)))
end
