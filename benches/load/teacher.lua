-- wrk script: GET /api/teachers/{id} over random real teacher ids.
-- Usage: wrk -t1 -c64 -d10s --latency -s teacher.lua http://HOST:PORT -- IDS_FILE
local ids = {}

function init(args)
  for line in io.lines(args[1]) do
    ids[#ids + 1] = line
  end
  math.randomseed(os.time() + tonumber(tostring(ids):match("0x(%x+)") or "0", 16) % 1000)
end

function request()
  return wrk.format("GET", "/api/teachers/" .. ids[math.random(#ids)])
end
