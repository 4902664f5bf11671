-- wrk script for bench/live_status.py: POST /api/v1/status (one message per request) or, with
-- PER > 1, POST /api/v1/status/batch (PER messages per request), paced in messages/s.
-- Usage: wrk -tT -cC -dDs -s bench/live_status.lua http://127.0.0.1:PORT -- KEY TAG RATE CONVS T [PER]
--   KEY    the API key (global)
--   TAG    run tag written into every message ("w" warm-up, "m" measured)
--   RATE   messages/s offered by all threads together (each thread paces RATE / T)
--   CONVS  conversations conv-0 .. conv-(CONVS-1), taken in turn
--   T      wrk's -t (each thread paces its share)
-- Each message's text is "bench TAG SEND_US TID-SEQ": SEND_US is CLOCK_REALTIME in microseconds
-- taken just before the request is written, so a websocket receiver on this machine computes
-- publish -> receive latency per message. Pacing is a schedule per thread (one slot every
-- T / RATE seconds; a connection that is ready waits for the next free slot, a late thread
-- catches up on at most CATCH_UP_US of missed slots), so the offered rate does not depend on
-- the server's latency as long as enough connections are free.
-- Prints "BENCH k=v ..." (status counts, exact latency percentiles in us) and "SENT n0,n1,..."
-- (requests written per conversation) at the end.

local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clk_id, bench_timespec *tp);
]]
local CLOCK_REALTIME = 0
local CATCH_UP_US = 200000
local ts = ffi.new("bench_timespec")

local function now_us()
  ffi.C.clock_gettime(CLOCK_REALTIME, ts)
  return tonumber(ts.tv_sec) * 1000000 + math.floor(tonumber(ts.tv_nsec) / 1000)
end

local threads = {}

function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  tag = args[2] or "m"
  local rate = tonumber(args[3] or "1000")
  convs = tonumber(args[4] or "100")
  nthreads = tonumber(args[5] or "1")
  per = tonumber(args[6] or "1")
  wrk.method = "POST"
  wrk.path = per > 1 and "/api/v1/status/batch" or "/api/v1/status"
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["Authorization"] = "Bearer " .. (args[1] or "")
  interval = nthreads * per * 1000000 / rate
  next_slot = 0
  counter = 0
  accepted = 0
  other = 0
  first_other = nil
  sent = {}
  for i = 0, convs - 1 do
    sent[i] = 0
  end
end

function delay()
  local now = now_us()
  if next_slot == 0 then
    next_slot = now  -- no catching up on the time before the first request
  elseif next_slot < now - CATCH_UP_US then
    next_slot = now - CATCH_UP_US
  end
  local slot = next_slot
  next_slot = next_slot + interval
  if slot <= now then
    return 0
  end
  return math.floor((slot - now) / 1000)
end

local function message()
  -- messages of all threads interleave over the conversations
  local conv = (counter * nthreads + tid - 1) % convs
  counter = counter + 1
  sent[conv] = sent[conv] + 1
  return string.format(
    '{"conversation_id":"conv-%d","category":"progress","message":"bench %s %d %d-%d",' ..
    '"metadata":{"step":%d}}',
    conv, tag, now_us(), tid, counter, counter)
end

function request()
  if per == 1 then
    return wrk.format(nil, nil, nil, message())
  end
  local parts = {}
  for i = 1, per do
    parts[i] = message()
  end
  return wrk.format(nil, nil, nil, '{"messages":[' .. table.concat(parts, ",") .. ']}')
end

function response(status, headers, body)
  if status == 202 then
    accepted = accepted + per
  else
    other = other + 1
    if other == 1 then
      first_other = status .. " " .. string.sub(string.gsub(body or "", "%s+", " "), 1, 200)
    end
  end
end

function done(summary, latency, requests)
  local a, o, n = 0, 0, 0
  local convs = threads[1]:get("convs")
  local per = {}
  for i = 0, convs - 1 do
    per[i] = 0
  end
  for _, t in ipairs(threads) do
    n = n + t:get("counter")
    a = a + t:get("accepted")
    o = o + t:get("other")
    local f = t:get("first_other")
    if f then
      io.write("FIRST_OTHER " .. f .. "\n")
    end
    local s = t:get("sent")
    for i = 0, convs - 1 do
      per[i] = per[i] + (s[i] or 0)
    end
  end
  local e = summary.errors
  io.write(string.format(
    "BENCH accepted=%d other=%d sent=%d requests=%d duration_us=%d " ..
    "err_connect=%d err_read=%d err_write=%d err_status=%d err_timeout=%d " ..
    "p50_us=%d p90_us=%d p99_us=%d p999_us=%d max_us=%d mean_us=%d\n",
    a, o, n, summary.requests, summary.duration,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean))
  local parts = {}
  for i = 0, convs - 1 do
    parts[#parts + 1] = tostring(per[i])
  end
  io.write("SENT " .. table.concat(parts, ",") .. "\n")
end
