-- wrk script: like teacher.lua, but each connection waits DELAY_MS between
-- requests, so that the read load is steady rather than saturating.
-- Usage: wrk -t1 -c10 -d30s --latency -s paced.lua http://HOST:PORT -- IDS_FILE DELAY_MS
local ids = {}
local pause = 5

function init(args)
  for line in io.lines(args[1]) do
    ids[#ids + 1] = line
  end
  pause = tonumber(args[2] or "5")
  math.randomseed(os.time())
end

function delay()
  return pause
end

function request()
  return wrk.format("GET", "/api/teachers/" .. ids[math.random(#ids)])
end
