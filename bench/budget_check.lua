-- wrk script for bench/budget_check.py: POST /api/v1/budgets/check for a request attributed to
-- team "search", project "ranker", user "u1" (four budgets apply: global, team, project, user).
-- Usage: wrk -t2 -c32 -d20s --latency -s bench/budget_check.lua http://127.0.0.1:PORT -- \
--          KEY RESERVE(0/1) TTL_SECONDS RATE THREADS EXPECTED_BUDGETS
-- RATE > 0 paces the run by the clock: each wrk thread hands out send times RATE/THREADS per
-- second apart (CLOCK_MONOTONIC through LuaJIT's ffi) and a connection waits for its slot, so
-- the offered rate is RATE whatever the latency, as long as a connection is free (at most -c
-- requests in flight; a thread that falls behind does not burst to catch up). wrk's latency
-- starts when the request is written, so it excludes the wait. RATE = 0: as fast as possible.
-- Every 200 response is checked cheaply (plain substring searches, no JSON parsing): "ok" means
-- "allowed":true, exactly EXPECTED_BUDGETS entries in "budgets" (counted by their "period_end"
-- field, which only budget entries carry) and, with RESERVE=1, a reservation_id.
-- Prints one "BENCH k=v ..." line at the end with counts and exact latency percentiles (us).

local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clk_id, bench_timespec *tp);
]]
local CLOCK_MONOTONIC = 1
local ts = ffi.new("bench_timespec")

local function now_ms()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, ts)
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end

local threads = {}

function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  reserve = tonumber(args[2] or "1")
  local ttl = tonumber(args[3] or "300")
  local rate = tonumber(args[4] or "0")
  local nthreads = tonumber(args[5] or "1")
  expect = tonumber(args[6] or "4")
  interval = rate > 0 and 1000 * nthreads / rate or 0  -- ms between this thread's send slots
  next_slot = nil
  late = 0
  wrk.method = "POST"
  wrk.path = "/api/v1/budgets/check"
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["Authorization"] = "Bearer " .. (args[1] or "")
  template = '{"model":"gpt-4o-mini","provider":"openai","team_id":"search",' ..
    '"project_id":"ranker","user_id":"u1","input_tokens":%d,"max_output_tokens":400,' ..
    '"reserve":' .. (reserve == 1 and "true" or "false") ..
    ',"reservation_ttl_seconds":' .. ttl .. '}'
  counter = 0
  ok = 0
  denied = 0
  bad = 0
  other = 0
  first_other = nil
  math.randomseed(os.time() * 1000 + tid * 7919)
end

function request()
  counter = counter + 1
  return wrk.format(nil, nil, nil, string.format(template, 1000 + counter % 400))
end

function delay()
  if interval <= 0 then
    return 0
  end
  local now = now_ms()
  if next_slot == nil or next_slot < now then
    if next_slot ~= nil then
      late = late + 1  -- no connection was free at this slot's time
    end
    next_slot = now
  end
  local wait = next_slot - now
  next_slot = next_slot + interval
  -- wrk waits whole milliseconds: round up or down at random so the mean wait is `wait`
  local base = math.floor(wait)
  if math.random() < wait - base then
    return base + 1
  end
  return base
end

local function note(status, body)
  if first_other == nil then
    first_other = status .. " " .. string.sub(string.gsub(body or "", "%s+", " "), 1, 300)
  end
end

function response(status, headers, body)
  if status ~= 200 then
    other = other + 1
    note(status, body)
    return
  end
  if not string.find(body, '"allowed":true', 1, true) then
    denied = denied + 1
    note(status, body)
    return
  end
  local n, pos = 0, 1
  while true do
    local s = string.find(body, '"period_end":', pos, true)
    if not s then break end
    n = n + 1
    pos = s + 13
  end
  if n == expect and (reserve == 0 or string.find(body, '"reservation_id":"rsv_', 1, true)) then
    ok = ok + 1
  else
    bad = bad + 1
    note(status, body)
  end
end

function done(summary, latency, requests)
  local k, d, b, o, sent, lt = 0, 0, 0, 0, 0, 0
  for _, t in ipairs(threads) do
    sent = sent + t:get("counter")
    lt = lt + t:get("late")
    k = k + t:get("ok")
    d = d + t:get("denied")
    b = b + t:get("bad")
    o = o + t:get("other")
    local f = t:get("first_other")
    if f then
      io.write("FIRST_OTHER " .. f .. "\n")
    end
  end
  local e = summary.errors
  io.write(string.format(
    "BENCH ok=%d denied=%d bad=%d other=%d sent=%d late=%d requests=%d duration_us=%d " ..
    "err_connect=%d err_read=%d err_write=%d err_status=%d err_timeout=%d " ..
    "p50_us=%d p75_us=%d p90_us=%d p99_us=%d p999_us=%d max_us=%d mean_us=%d\n",
    k, d, b, o, sent, lt, summary.requests, summary.duration,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(75), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9), latency.max, latency.mean))
end
