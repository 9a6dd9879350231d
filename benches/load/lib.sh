# Shared by run.sh and soak.sh (sourced, not run).

# log: a timestamped progress line on stderr. say: a line of the results
# file ($RESULTS), echoed.
log() { printf '%s  %s\n' "$(date +%T)" "$*" >&2; }
say() { printf '%s\n' "$*" | tee -a "$RESULTS"; }

# start_tansu PORT LOG: starts the tansu broker with in-memory storage on
# 127.0.0.1:PORT, waits until it listens, creates the nine contract topics
# (3 partitions each) and appends its pid to PIDS.
start_tansu() {
  local port=$1 logfile=$2 tansu=${EMIS_EDGE_TANSU:-tansu}
  local url=tcp://127.0.0.1:$port
  "$tansu" broker --storage-engine memory://tansu/ --listener-url "$url" \
    --advertised-listener-url "$url" >"$logfile" 2>&1 &
  PIDS+=($!)
  until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do sleep 0.05; done
  for t in class teacher assignment; do
    for e in created updated deleted; do
      "$tansu" topic create "emis.$t.$e" --partitions 3 --broker "$url" >/dev/null
    done
  done
}
