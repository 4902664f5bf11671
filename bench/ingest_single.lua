-- wrk script for bench/ingest_single.py: POST /api/v1/usage, one event per request, each with a
-- unique request_id (run prefix, wrk thread id, random salt, per-thread counter).
-- Usage: wrk -t2 -c16 -d20s --latency -s bench/ingest_single.lua http://127.0.0.1:PORT -- PREFIX KEY [PAUSE_MS]
-- PAUSE_MS > 0 paces each connection (it waits that long before each request), so the offered
-- rate is about connections / (pause + latency): latency is then measured at a chosen load
-- instead of at saturation. wrk's latency excludes the pause.
-- Prints one "BENCH k=v ..." line at the end with status counts and exact latency percentiles (us).

local threads = {}

function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  prefix = args[1] or "wrk"
  pause = tonumber(args[3] or "0")
  wrk.method = "POST"
  wrk.path = "/api/v1/usage"
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["Authorization"] = "Bearer " .. (args[2] or "")
  counter = 0
  created = 0
  dup = 0
  other = 0
  first_other = nil
  math.randomseed(os.time() * 1000 + tid * 7919)
  salt = string.format("%06x", math.random(0, 0xffffff))
end

function request()
  counter = counter + 1
  local body = string.format(
    '{"request_id":"%s-%d-%s-%d","provider":"openai","model":"gpt-4o-mini",' ..
    '"input_tokens":%d,"output_tokens":%d,"team_id":"t1","project_id":"p1",' ..
    '"feature":"chat","agent":"a1"}',
    prefix, tid, salt, counter, 100 + counter % 50, 20 + counter % 13)
  return wrk.format(nil, nil, nil, body)
end

function delay()
  -- wrk waits whole milliseconds: alternate the two neighbours so the mean is `pause`
  local base = math.floor(pause)
  if math.random() < pause - base then
    return base + 1
  end
  return base
end

function response(status, headers, body)
  if status == 201 then
    created = created + 1
  elseif status == 200 then
    dup = dup + 1
  else
    other = other + 1
    if other == 1 then
      first_other = status .. " " .. string.sub(string.gsub(body or "", "%s+", " "), 1, 200)
    end
  end
end

function done(summary, latency, requests)
  local c, d, o, sent = 0, 0, 0, 0
  for _, t in ipairs(threads) do
    sent = sent + t:get("counter")
    c = c + t:get("created")
    d = d + t:get("dup")
    o = o + t:get("other")
    local f = t:get("first_other")
    if f then
      io.write("FIRST_OTHER " .. f .. "\n")
    end
  end
  local e = summary.errors
  io.write(string.format(
    "BENCH created=%d duplicate=%d other=%d sent=%d requests=%d duration_us=%d " ..
    "err_connect=%d err_read=%d err_write=%d err_status=%d err_timeout=%d " ..
    "p50_us=%d p75_us=%d p90_us=%d p99_us=%d p999_us=%d max_us=%d mean_us=%d\n",
    c, d, o, sent, summary.requests, summary.duration,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(75), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9), latency.max, latency.mean))
end
