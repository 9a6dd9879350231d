#!/usr/bin/env bash
# Soak test (issue #6): a node under 1,000 changes/s through a real broker
# (tansu) plus a steady read load, for SOAK_SECS (default 600), reporting
# resident memory, read latency, lag and applied events per window.
#
#   benches/load/soak.sh                     # province-scale store, 10 minutes
#   SCALE=demo SOAK_SECS=60 benches/load/soak.sh   # a quick try
#
# Pass: resident memory grows ≤ 10 % from the end of warm-up (WARMUP_SECS,
# default 120) to the end. Needs: wrk, curl, tansu (cargo install tansu
# --locked --features dynostore). Results: $OUT/soak.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=benches/load/lib.sh
. benches/load/lib.sh

SCALE=${SCALE:-province}
SOAK_SECS=${SOAK_SECS:-600}
WARMUP_SECS=${WARMUP_SECS:-120}
WINDOW=${WINDOW:-30}
RATE=${RATE:-1000}
READ_CONNS=${READ_CONNS:-10}
READ_DELAY_MS=${READ_DELAY_MS:-5}
CACHE_MB=${CACHE_MB:-64}
OUT=${OUT:-target/load/soak-$SCALE}
PORT=${PORT:-18180}
KPORT=$((PORT + 1))
BIN=target/release/emis-edge
W=$OUT/work
rm -rf "$W"
mkdir -p "$W"
RESULTS=$OUT/soak.md

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

command -v wrk >/dev/null || { echo "soak.sh: wrk is needed (apt-get install wrk)" >&2; exit 2; }
log "building the release binaries"
build_release
have_tansu || { echo "soak.sh: tansu is needed (cargo install tansu --locked --features dynostore)" >&2; exit 2; }

log "generating and importing the $SCALE data set"
cat >"$W/edge.toml" <<EOT
[node]
id = "soak"
data_dir = "$W/data"
[http]
listen = "127.0.0.1:$PORT"
[kafka]
brokers = "127.0.0.1:$KPORT"
[schools]
all = true
[store]
cache_mb = $CACHE_MB
[log]
level = "warn"
EOT
"$BIN" gen --scale "$SCALE" --out "$W/snapshot.ndjson" --teacher-ids "$W/ids.txt" 2>/dev/null
"$BIN" import --config "$W/edge.toml" "$W/snapshot.ndjson" >/dev/null 2>&1
rm -f "$W/snapshot.ndjson"

start_tansu "$KPORT" "$W/tansu.log"

BASE=http://127.0.0.1:$PORT
"$BIN" serve --config "$W/edge.toml" 2>"$W/serve.log" &
NODE=$!
PIDS+=("$NODE")
until curl -sf -o /dev/null "$BASE/health/ready"; do sleep 0.05; done
# Let the worker render every teacher document, then read the whole store
# once (an export through the node): redb's page cache (store.cache_mb)
# fills to its bound, as it does on a node that has run for a while, so that
# growth after warm-up means something.
sleep 10
"$BIN" export --config "$W/edge.toml" --out /dev/null >/dev/null 2>&1

"$BIN" gen --scale "$SCALE" --brokers "127.0.0.1:$KPORT" --skip-initial --trickle "$RATE" \
  --malformed-per-mille 5 --duration-secs "$SOAK_SECS" >"$W/trickle.log" 2>&1 &
PIDS+=($!)

: >"$RESULTS"
say "# Soak, scale \`$SCALE\`, $(date -u +%FT%TZ)"
say ""
say "$RATE changes/s through tansu (0.5 % malformed) and $READ_CONNS read connections each pausing ${READ_DELAY_MS} ms between requests, for $SOAK_SECS s; store.cache_mb = $CACHE_MB; $(nproc) cores."
say ""
say "| t (s) | RSS (MiB) | reads/s | read p50 | read p99 | events applied (total) | lag |"
say "|---|---|---|---|---|---|---|"
metric() { curl -s "$BASE/metrics" | awk -v m="$1" '$1 ~ "^"m {s+=$2} END{printf "%d", s}'; }
start=$(date +%s)
warm_rss=
while :; do
  t=$(($(date +%s) - start))
  ((t < SOAK_SECS)) || break
  out=$(wrk -t1 -c"$READ_CONNS" -d"${WINDOW}s" --latency -s benches/load/paced.lua "$BASE" -- "$W/ids.txt" "$READ_DELAY_MS")
  rps=$(awk '/Requests\/sec/{printf "%.0f", $2}' <<<"$out")
  p50=$(awk '$1=="50%"{print $2}' <<<"$out")
  p99=$(awk '$1=="99%"{print $2}' <<<"$out")
  rss=$(awk '/VmRSS/{printf "%.0f", $2/1024}' "/proc/$NODE/status")
  applied=$(metric 'emis_edge_events_total\{outcome="applied"')
  lag=$(metric 'emis_edge_partition_lag')
  t=$(($(date +%s) - start))
  say "| $t | $rss | $rps | $p50 | $p99 | $applied | $lag |"
  if [[ -z $warm_rss ]] && ((t >= WARMUP_SECS)); then warm_rss=$rss; fi
  if [[ -n $warm_rss ]] && ((rss > ${max_rss:-0})); then max_rss=$rss; fi
done
end_rss=$(awk '/VmRSS/{printf "%.0f", $2/1024}' "/proc/$NODE/status")
say ""
if [[ -n $warm_rss ]]; then
  growth=$(awk "BEGIN{printf \"%.1f\", 100*($end_rss-$warm_rss)/$warm_rss}")
  say "Resident memory after warm-up (${WARMUP_SECS} s): $warm_rss MiB; at the end: $end_rss MiB (highest after warm-up: ${max_rss:-$end_rss} MiB); growth **$growth %** (target ≤ 10 %)."
fi
say ""
say "Node still ready at the end: $(curl -s -o /dev/null -w '%{http_code}' "$BASE/health/ready"); trickle: $(tail -1 "$W/trickle.log")."
log "results in $RESULTS"
