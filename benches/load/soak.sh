#!/usr/bin/env bash
# Soak test (issue #6): a node under 1,000 changes/s through a real broker
# (tansu) plus a steady read load, for SOAK_SECS (default 600), reporting
# resident memory, read latency, lag and applied events per window.
#
#   benches/load/soak.sh                     # province-scale store, 10 minutes
#   SCALE=demo SOAK_SECS=60 benches/load/soak.sh   # a quick try
#
# Pass: resident memory (the median of one sample a second in a window)
# grows ≤ 10 % from the end of warm-up (WARMUP_SECS,
# default 120) to the end, and AFTER_SECS (default 120) after the changes
# stop and the node has caught up it is within 10 % of the warm-up level.
# Needs: wrk, curl, tansu (cargo install tansu --locked --features
# dynostore). Results: $OUT/soak.md.
#
# Heap profile: NODE_BIN=<a binary built with --features dhat-heap> runs
# `serve` from that binary (the import and the change generator still use
# the release build); the node is stopped with SIGTERM at the end and
# writes $OUT/dhat-heap.json (open it in dhat's viewer, dh_view.html).
# NODE_BIN=<a binary built with --features cache-metrics> adds a column:
# the bytes redb's page cache holds at the end of each window.
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
NODE_BIN=${NODE_BIN:-$BIN}
AFTER_SECS=${AFTER_SECS:-120}
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
EMIS_EDGE_DHAT_FILE=$OUT/dhat-heap.json "$NODE_BIN" serve --config "$W/edge.toml" 2>"$W/serve.log" &
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
TRICKLE=$!
PIDS+=("$TRICKLE")

: >"$RESULTS"
say "# Soak, scale \`$SCALE\`, $(date -u +%FT%TZ)"
say ""
say "$RATE changes/s through tansu (0.5 % malformed) and $READ_CONNS read connections each pausing ${READ_DELAY_MS} ms between requests, for $SOAK_SECS s; store.cache_mb = $CACHE_MB; $(nproc) cores."
say ""
say "| t (s) | RSS median (MiB) | RSS max | redb cache (MiB) | reads/s | read p50 | read p99 | events applied (total) | lag |"
say "|---|---|---|---|---|---|---|---|---|"
metric() { curl -s "$BASE/metrics" | awk -v m="$1" '$1 ~ "^"m {s+=$2} END{printf "%d", s}'; }
# Only a binary built with the cache-metrics feature reports it.
cache_mib() { curl -s "$BASE/metrics" | awk '$1=="emis_edge_store_cache_bytes"{printf "%.0f", $2/1048576; f=1} END{if(!f) printf "—"}'; }
# Resident memory swings by tens of MiB within seconds (a write
# transaction's dirty pages are allocated and freed per batch), so one
# sample per window says little: rss_window SECS samples it once a second
# and sets rss (the median, what the growth is measured on) and rss_max.
rss_window() {
  local samples=()
  for ((i = 0; i < $1; i++)); do
    samples+=("$(awk '/VmRSS/{printf "%.0f", $2/1024}' "/proc/$NODE/status")")
    sleep 1
  done
  rss=$(printf '%s\n' "${samples[@]}" | sort -n | awk '{v[NR]=$1} END{print v[int((NR+1)/2)]}')
  rss_max=$(printf '%s\n' "${samples[@]}" | sort -n | tail -1)
}
start=$(date +%s)
warm_rss=
while :; do
  t=$(($(date +%s) - start))
  ((t < SOAK_SECS)) || break
  wrk -t1 -c"$READ_CONNS" -d"${WINDOW}s" --latency -s benches/load/paced.lua "$BASE" -- "$W/ids.txt" "$READ_DELAY_MS" >"$W/wrk.out" &
  reads=$!
  rss_window "$WINDOW"
  wait "$reads"
  out=$(<"$W/wrk.out")
  rps=$(awk '/Requests\/sec/{printf "%.0f", $2}' <<<"$out")
  p50=$(awk '$1=="50%"{print $2}' <<<"$out")
  p99=$(awk '$1=="99%"{print $2}' <<<"$out")
  applied=$(metric 'emis_edge_events_total\{outcome="applied"')
  lag=$(metric 'emis_edge_partition_lag')
  t=$(($(date +%s) - start))
  say "| $t | $rss | $rss_max | $(cache_mib) | $rps | $p50 | $p99 | $applied | $lag |"
  if [[ -z $warm_rss ]] && ((t >= WARMUP_SECS)); then warm_rss=$rss; fi
  if [[ -n $warm_rss ]] && ((rss_max > ${max_rss:-0})); then max_rss=$rss_max; fi
done
end_rss=$rss
# After the load: no more changes or reads; once the node has applied the
# backlog, resident memory should settle back near the warm-up level.
wait "$TRICKLE" || true
caught_up=$(date +%s)
while (($(metric 'emis_edge_partition_lag') > 0)) && (($(date +%s) - caught_up < 300)); do sleep 1; done
say ""
say "After the load (changes stopped, lag $(metric 'emis_edge_partition_lag') after $(($(date +%s) - caught_up)) s):"
say ""
say "| t after (s) | RSS median (MiB) | RSS max | redb cache (MiB) |"
say "|---|---|---|---|"
for ((t = 10; t <= AFTER_SECS; t += 10)); do
  rss_window 10
  say "| $t | $rss | $rss_max | $(cache_mib) |"
done
after_rss=$rss
say ""
if [[ -n $warm_rss ]]; then
  growth=$(awk "BEGIN{printf \"%.1f\", 100*($end_rss-$warm_rss)/$warm_rss}")
  back=$(awk "BEGIN{printf \"%.1f\", 100*($after_rss-$warm_rss)/$warm_rss}")
  say "Resident memory (medians of one sample a second per window) after warm-up (${WARMUP_SECS} s): $warm_rss MiB; in the last window: $end_rss MiB (highest single sample after warm-up: ${max_rss:-?} MiB); growth **$growth %** (target ≤ 10 %); ${AFTER_SECS} s after the load: $after_rss MiB, **$back %** from the warm-up level (target within ± 10 %)."
fi
say ""
say "Node still ready at the end: $(curl -s -o /dev/null -w '%{http_code}' "$BASE/health/ready"); trickle: $(tail -1 "$W/trickle.log")."
kill -TERM "$NODE"
wait "$NODE" && say "Node stopped on SIGTERM with status 0." || say "Node stopped on SIGTERM with status $?."
log "results in $RESULTS"
