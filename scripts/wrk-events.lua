-- A lean client for durable ingest (BENCHMARKS.md): wrk posts 500-event batches of page views
-- and purchases spread over 20,000 visitors, each request's body built in advance so that the
-- client spends its time sending, not generating.
--
--   wrk -t2 -c8 -d30s -s scripts/wrk-events.lua http://127.0.0.1:8080/v1/events
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

local bodies = {}
local categories = { "shoes", "hats", "bags", "shirts", "coats", "socks", "belts", "watches" }

function init(args)
  math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16))
  for b = 1, 64 do
    local events = {}
    for i = 1, 500 do
      local visitor = "wrk-" .. math.random(0, 19999)
      if math.random() < 0.9 then
        events[i] = string.format(
          '{"event":"page_view","visitor_id":"%s","data":{"category":"%s"}}',
          visitor, categories[math.random(#categories)])
      else
        events[i] = string.format(
          '{"event":"purchase","visitor_id":"%s","data":{"order_total":%d}}', visitor, math.random(5, 500))
      end
    end
    bodies[b] = '{"events":[' .. table.concat(events, ",") .. ']}'
  end
end

local n = 0
function request()
  n = n + 1
  return wrk.format(nil, nil, nil, bodies[(n % #bodies) + 1])
end

function response(status, headers, body)
  if status >= 300 then
    io.stderr:write("status " .. status .. ": " .. body .. "\n")
  end
end
