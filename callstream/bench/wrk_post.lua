-- wrk script for `callstream bench`: POST a pool of pre-signed webhook requests, in turn.
--
-- wrk's Lua has no HMAC, so callstream.bench.pool signs every request in Python (fresh
-- timestamp, fresh call id) and writes a copy of this file with the pool where the marker
-- line is: each entry is a complete raw HTTP/1.1 request, headers and body.

local pool = {
--@@POOL@@
}

local counter = 0

function setup(thread)
  -- Each thread starts at a different place in the pool.
  thread:set("start", counter)
  counter = counter + 1
end

local index = 1

function init(args)
  local first = tonumber(start) or 0
  index = (first * 7919) % #pool + 1
end

function request()
  local raw = pool[index]
  index = index % #pool + 1
  return raw
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'CALLSTREAM_WRK {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"min":%d,"mean":%.1f,"max":%d,"p50":%d,"p90":%d,"p99":%d,"p999":%d}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency.max,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9)))
end
