#!/usr/bin/env bash
# Tiered replication under load (issue 13): one provincial node fed from
# tansu, school nodes following it over HTTP as separate processes.
#
#   benches/load/tree.sh                                  # every step
#   STEPS="bootstrap followers" benches/load/tree.sh      # some of them
#   OUT=/somewhere/with/space benches/load/tree.sh
#
# Set-up (always): the release binaries and benches/followers.rs; the
# generator's province (seed 1: 1,000 schools, 100,000 teachers) imported
# with `emis-edge import` (once per $OUT; each run starts the parent on a
# fresh copy of it); tansu (test-broker); the parent: `serve` with
# kafka.brokers, schools.all, http.max_connections = 2048 and
# http.max_long_polls = 1100 (what docs/OPERATIONS.md advises for 1,000
# school nodes). Steps (STEPS):
#
#   bootstrap  BOOTSTRAPS times: an empty school node (one school, 100
#              teachers) started against the parent; time until
#              /health/ready is 200 and its answers are there
#   followers  FOLLOWERS school nodes (`serve` with [upstream], one school
#              each, their own data dir and port). ROUNDS times: the
#              parent's lookups (wrk -t1 -c64 on the teacher route) while
#              RATE changes/s flow, without the followers, then with them
#              (the same run); event-to-visible at the followers, under
#              that wrk load and on its own (LAT_SECS)
#   bytes      a day of changes (DAY_CHANGES published at DAY_RATE/s):
#              bytes received by school nodes from the parent against a
#              school node consuming Kafka, for the same period, plus each
#              one's idle traffic (IDLE_SECS without changes); one school
#              node is offline during the day: its catch-up time and bytes
#   idle       HOLD long-polls held at the parent (benches/followers.rs
#              `hold`, one school each) while wrk reads: lookup p99 with
#              them against without, ROUNDS times, with the parent idle and
#              with RATE changes/s
#   defaults   the parent restarted with the default http limits
#              (max_connections 1024, max_long_polls 512) and HOLD
#              long-polls: what a provincial node without the advice does
#
# Needs: wrk, curl, jq, ss (iproute2), tansu (cargo install tansu --locked
# --features dynostore). Results: $OUT/tree.md; logs under $OUT/work.
# Everything listens on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=benches/load/lib.sh
. benches/load/lib.sh

STEPS=${STEPS:-"bootstrap followers bytes idle defaults"}
OUT=${OUT:-target/load/tree}
FOLLOWERS=${FOLLOWERS:-200}
RATE=${RATE:-100}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10s}
LAT_SECS=${LAT_SECS:-60}
BOOTSTRAPS=${BOOTSTRAPS:-5}
DAY_CHANGES=${DAY_CHANGES:-100000}
DAY_RATE=${DAY_RATE:-500}
IDLE_SECS=${IDLE_SECS:-90}
HOLD=${HOLD:-1000}
PORT=${PORT:-18300}
KPORT=$((PORT + 1))
KSCHOOL_PORT=$((PORT + 2))
BOOT_PORT=$((PORT + 3))
FPORT0=$((PORT + 100)) # followers: FPORT0 .. FPORT0 + FOLLOWERS - 1
BIN=target/release/emis-edge
W=$OUT/work
mkdir -p "$W"
RESULTS=$OUT/tree.md
BASE=http://127.0.0.1:$PORT

for tool in wrk curl jq ss; do
  command -v "$tool" >/dev/null || { echo "tree.sh: $tool is needed" >&2; exit 2; }
done
# A provincial node with 1,000 followers holds more than 1,024 sockets: as
# the systemd unit's LimitNOFILE does.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

has() { [[ " $STEPS " == *" $1 "* ]]; }
now_ms() { date +%s%3N; }
PIDS=()
FPIDS=()
lat_load=()
wrk_load=()
cleanup() {
  for p in "${FPIDS[@]}" "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

log "building the release binaries and benches/followers.rs"
build_release
cargo bench --no-run --quiet --bench followers 2>/dev/null
FB=$(ls -t target/release/deps/followers-* | grep -v '\.d$' | head -1)
have_tansu || { echo "tree.sh: tansu is needed (cargo install tansu --locked --features dynostore)" >&2; exit 2; }

: >"$RESULTS"
say "# Tiered replication, $(date -u +%FT%TZ)"
say ""
say "Machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB; \`$BIN\` $(git rev-parse --short HEAD 2>/dev/null || echo '?'); load at start: $(uptime | sed 's/.*load average: //')"
say ""

# ---------------------------------------------------------------- set-up
parent_config() { # $1: extra [http] lines
  cat >"$W/parent.toml" <<EOF
[node]
id = "province"
data_dir = "$W/parent"
[http]
listen = "127.0.0.1:$PORT"
$1
[schools]
all = true
[store]
cache_mb = 64
[log]
level = "warn"
EOF
}
ADVISED=$'max_connections = 2048\nmax_long_polls = 1100'
parent_config "$ADVISED"

if [[ ! -f $W/imported/emis-edge.redb ]]; then
  rm -rf "$W/imported"
  log "generating and importing the province"
  "$BIN" gen --scale province --seed 1 --out "$W/snapshot.ndjson" --teacher-ids "$W/ids.txt" 2>>"$W/gen.log"
  t0=$(now_ms)
  EMIS_EDGE__NODE__DATA_DIR=$W/imported "$BIN" import --config "$W/parent.toml" "$W/snapshot.ndjson" >"$W/import.log" 2>&1
  log "imported in $(($(now_ms) - t0)) ms"
  rm -f "$W/snapshot.ndjson"
fi
# The parent starts on a copy of the imported store (the same store id
# every run); school nodes of an earlier run would hold cursors past it.
rm -rf "$W/parent" "$W"/f[0-9]* "$W/kschool" "$W/boot"
cp -r "$W/imported" "$W/parent"

start_tansu "$KPORT" "$W/tansu.log"
PARENT=
start_parent() { # env for the parent as arguments: VAR=value ...
  env "$@" "$BIN" serve --config "$W/parent.toml" 2>>"$W/parent.log" &
  PARENT=$!
  PIDS+=("$PARENT")
  until curl -sf -o /dev/null "$BASE/health/ready"; do sleep 0.01; done
}
stop_parent() { kill -TERM "$PARENT"; wait "$PARENT" || true; }
start_parent EMIS_EDGE__KAFKA__BROKERS=127.0.0.1:$KPORT
until curl -s "$BASE/api/sync/status" | grep -q '"pendingDocuments":0[,}]'; do sleep 0.2; done

# wrk's summary → "req/s p50 p99 errors"
wrk_run() {
  local out rps p50 p99 errs
  out=$(wrk -t1 -c64 -d"$DURATION" --latency -s benches/load/teacher.lua "$BASE" -- "$W/ids.txt")
  echo "$out" >>"$W/wrk.log"
  rps=$(awk '/Requests\/sec/{printf "%.0f", $2}' <<<"$out")
  p50=$(awk '$1=="50%"{print $2}' <<<"$out")
  p99=$(awk '$1=="99%"{print $2}' <<<"$out")
  errs=$(awk '/Non-2xx/{printf "non2xx:%s ", $5} /Socket errors/{gsub(/,/, ""); printf "connect:%s read:%s write:%s timeout:%s", $4, $6, $8, $10}' <<<"$out")
  echo "$rps $p50 $p99 ${errs:-0}"
}
ms_of() { # wrk's "1.23ms" / "850.00us" / "1.20s" → ms
  awk -v v="$1" 'BEGIN{ if (v ~ /us$/) printf "%.3f", v/1000; else if (v ~ /ms$/) printf "%.3f", v+0; else if (v ~ /s$/) printf "%.3f", v*1000; else print v }'
}
load() { uptime | sed 's/.*load average: //; s/,.*//'; }
metric() { # URL REGEX → the sum of the samples whose name{labels} match ^REGEX
  curl -s "$1/metrics" | awk -v m="$2" '$1 ~ "^" m {s += $NF} END {printf "%.0f", s}'
}
# Bytes received by process $1 on its TCP connections to port $2 (the
# kernel's tcp_info, payload bytes, HTTP/Kafka headers included).
rx_bytes() {
  ss -tinpH state established "( dport = :$2 )" | awk -v pid="pid=$1," '
    /users:/ { mine = index($0, pid) > 0; next }
    mine { if (match($0, /bytes_received:[0-9]+/)) s += substr($0, RSTART + 15, RLENGTH - 15); mine = 0 }
    END { printf "%.0f", s }'
}
# Until a Kafka node has taken in everything published: its lag is 0 and
# its event counters (every outcome) stood still for a second.
settled() {
  local a b
  b=$(metric "$1" 'emis_edge_events_total')
  while :; do
    sleep 1
    a=$b
    b=$(metric "$1" 'emis_edge_events_total')
    [[ $a == "$b" && $(metric "$1" 'emis_edge_partition_lag') == 0 ]] && return 0
  done
}
wrk_run >/dev/null # warm-up: redb's cache and the OS page cache

# --------------------------------------------------------------- followers
"$FB" schools --count "$FOLLOWERS" --stride 5 >"$W/schools.txt"
: >"$W/followers.txt"
i=0
while read -r school; do
  port=$((FPORT0 + i))
  d=$W/f$i
  mkdir -p "$d"
  cat >"$d/edge.toml" <<EOF
[node]
id = "school-$i"
data_dir = "$d/data"
[http]
listen = "127.0.0.1:$port"
[schools]
ids = ["$school"]
[upstream]
url = "$BASE"
[store]
cache_mb = 4
[log]
level = "warn"
EOF
  echo "$school $port" >>"$W/followers.txt"
  i=$((i + 1))
done <"$W/schools.txt"

follower_up() { # index → whether its upstream is caught up
  curl -s "http://127.0.0.1:$((FPORT0 + $1))/api/sync/status" 2>/dev/null | jq -e '.upstream.caughtUp == true' >/dev/null 2>&1
}
start_follower() {
  "$BIN" serve --config "$W/f$1/edge.toml" 2>>"$W/f$1/serve.log" &
  FPIDS[$1]=$!
}
stop_follower() {
  [[ -n ${FPIDS[$1]:-} ]] || return 0
  kill -TERM "${FPIDS[$1]}" 2>/dev/null || true
  wait "${FPIDS[$1]}" 2>/dev/null || true
  unset "FPIDS[$1]"
}
start_followers() {
  local i t0
  t0=$(now_ms)
  for ((i = 0; i < FOLLOWERS; i++)); do [[ -n ${FPIDS[$i]:-} ]] || start_follower "$i"; done
  for ((i = 0; i < FOLLOWERS; i++)); do
    until follower_up "$i"; do sleep 0.05; done
  done
  log "$FOLLOWERS followers caught up in $(($(now_ms) - t0)) ms"
}
stop_followers() {
  local i
  for i in "${!FPIDS[@]}"; do kill -TERM "${FPIDS[$i]}" 2>/dev/null || true; done
  for i in "${!FPIDS[@]}"; do wait "${FPIDS[$i]}" 2>/dev/null || true; done
  FPIDS=()
}
# latency FOLLOWERS-FILE SECS LOG [--parent URL]: the trickle at RATE and
# event-to-visible, in the background; returns once it publishes.
LAT=
latency_bg() {
  local file=$1 secs=$2 logf=$3
  shift 3
  "$FB" latency --brokers "127.0.0.1:$KPORT" --followers "$file" --rate "$RATE" --secs "$secs" "$@" >"$logf" 2>"$logf.err" &
  LAT=$!
  PIDS+=("$LAT")
  until grep -q '^publishing' "$logf.err" 2>/dev/null; do
    kill -0 "$LAT" 2>/dev/null || { cat "$logf.err" >&2; exit 1; }
    sleep 0.1
  done
}
kv() { # FILE KEY → value
  tr ' ' '\n' <"$1" | awk -F= -v k="$2" '$1 == k {print $2; exit}'
}

if has bootstrap; then
  log "bootstrap: $BOOTSTRAPS empty school nodes"
  say "## Bootstrap: an empty school node of one school (100 teachers)"
  say ""
  say "| run | school | /health/ready 200 | teachers listed and a detail answered | load |"
  say "|---|---|---|---|---|"
  for ((r = 1; r <= BOOTSTRAPS; r++)); do
    school=$(sed -n "$((500 + r))p" <("$FB" schools --count 1000))
    d=$W/boot
    rm -rf "$d"
    mkdir -p "$d"
    cat >"$d/edge.toml" <<EOF
[node]
id = "boot"
data_dir = "$d/data"
[http]
listen = "127.0.0.1:$BOOT_PORT"
[schools]
ids = ["$school"]
[upstream]
url = "$BASE"
[log]
level = "warn"
EOF
    "$FB" bootstrap --bin "$BIN" --config "$d/edge.toml" --url "http://127.0.0.1:$BOOT_PORT" --school "$school" --teachers 100 >"$d/out" 2>&1
    say "| $r | ${school:0:8}… | $(kv "$d/out" ready_ms) ms | $(kv "$d/out" answers_ms) ms | $(load) |"
  done
  rm -rf "$W/boot"
  say ""
  say "Target: ready with the school's answers in ≤ 1 s."
  say ""
fi

if has followers; then
  log "followers: $FOLLOWERS school nodes, $RATE changes/s, $ROUNDS rounds"
  : >"$W/nobody.txt"
  say "## $FOLLOWERS school nodes, $RATE changes/s over the province"
  say ""
  say "Parent lookups: \`wrk -t1 -c$((64)) -d$DURATION\` on the teacher route while $RATE changes/s arrive through tansu, without the school nodes, then with them (same round)."
  say ""
  say "| round | without: req/s | p50 | p99 | with: req/s | p50 | p99 | ratio | errors (without / with) | load |"
  say "|---|---|---|---|---|---|---|---|---|---|"
  for ((r = 1; r <= ROUNDS; r++)); do
    stop_followers
    latency_bg "$W/nobody.txt" 25 "$W/lat-none-$r.txt"
    sleep 3
    read -r n_rps n_p50 n_p99 n_err < <(wrk_run)
    wait "$LAT" || true
    start_followers
    latency_bg "$W/followers.txt" 25 "$W/lat-wrk-$r.txt" --parent "$BASE"
    sleep 3
    read -r w_rps w_p50 w_p99 w_err < <(wrk_run)
    wait "$LAT" || true
    wrk_load[r]=$(load)
    ratio=$(awk "BEGIN{printf \"%.2f\", $w_rps/$n_rps}")
    say "| $r | $n_rps | $n_p50 | $n_p99 | $w_rps | $w_p50 | $w_p99 | **$ratio** | $n_err / $w_err | $(load) |"
    # Event-to-visible with no wrk load.
    latency_bg "$W/followers.txt" "$LAT_SECS" "$W/lat-quiet-$r.txt" --parent "$BASE"
    wait "$LAT" || true
    lat_load[r]=$(load)
  done
  say ""
  say "Target: with ≥ 0.9 × without."
  say ""
  say "Event-to-visible (producer → the change answered by the school node's lookup route; assignments: by its change feed), p50 / p90 / p99 / max in ms:"
  say ""
  say "| round | load | changes of followed schools | at the school node | (teachers) | (classes) | (assignments) | at the parent (its feed) | lost | errors |"
  say "|---|---|---|---|---|---|---|---|---|---|"
  row() { # FILE → the columns
    local f=$1 k out=""
    for k in follower follower_teacher follower_class follower_assignment parent; do
      out+="$(kv "$f" "${k}_p50_ms") / $(kv "$f" "${k}_p90_ms") / **$(kv "$f" "${k}_p99_ms")** / $(kv "$f" "${k}_max_ms") | "
    done
    echo "$out$(kv "$f" lost) | $(kv "$f" errors)"
  }
  for ((r = 1; r <= ROUNDS; r++)); do
    say "| $r quiet (${LAT_SECS} s) | ${lat_load[r]} | $(kv "$W/lat-quiet-$r.txt" follower_n) | $(row "$W/lat-quiet-$r.txt") |"
    say "| $r under wrk (25 s) | ${wrk_load[r]} | $(kv "$W/lat-wrk-$r.txt" follower_n) | $(row "$W/lat-wrk-$r.txt") |"
  done
  say ""
  say "Target: p99 ≤ 250 ms at the school nodes. Memory of one school node: RSS $(awk '/VmRSS/{printf "%.0f MiB", $2/1024}' "/proc/${FPIDS[0]}/status" 2>/dev/null || echo '?'), PSS $(awk '/^Pss:/{printf "%.0f MiB", $2/1024}' "/proc/${FPIDS[0]}/smaps_rollup" 2>/dev/null || echo '?') (the binary's pages are shared); of the parent: RSS $(awk '/VmRSS/{printf "%.0f MiB", $2/1024}' "/proc/$PARENT/status")."
  say ""
fi

if has bytes; then
  log "bytes: a day of $DAY_CHANGES changes at $DAY_RATE/s"
  start_followers
  school0=$(sed -n 1p "$W/schools.txt")
  # A school node of the same school as follower 0, on Kafka: what every
  # school server downloads today.
  d=$W/kschool
  rm -rf "$d"
  mkdir -p "$d"
  cat >"$d/edge.toml" <<EOF
[node]
id = "school-on-kafka"
data_dir = "$d/data"
[http]
listen = "127.0.0.1:$KSCHOOL_PORT"
[kafka]
brokers = "127.0.0.1:$KPORT"
[schools]
ids = ["$school0"]
[store]
cache_mb = 4
[log]
level = "warn"
EOF
  "$BIN" serve --config "$d/edge.toml" 2>>"$d/serve.log" &
  KS=$!
  PIDS+=("$KS")
  until curl -sf -o /dev/null "http://127.0.0.1:$KSCHOOL_PORT/health/ready"; do sleep 0.05; done
  settled "http://127.0.0.1:$KSCHOOL_PORT"
  MEASURED=${MEASURED:-10} # followers 0 .. MEASURED-1
  OFFLINE=$MEASURED        # the one offline during the day
  snap() { # → "kafka-school parent f0-rx f0-metric ... " (bytes)
    local s i
    s="$(rx_bytes "$KS" "$KPORT") $(rx_bytes "$PARENT" "$KPORT")"
    for ((i = 0; i < MEASURED; i++)); do
      s+=" $(rx_bytes "${FPIDS[$i]}" "$PORT") $(metric "http://127.0.0.1:$((FPORT0 + i))" emis_edge_upstream_bytes_total)"
    done
    echo "$s"
  }
  lines_of() { metric "http://127.0.0.1:$((FPORT0 + $1))" emis_edge_upstream_lines_total; }
  sleep 2
  read -ra idle0 < <(snap)
  t0=$(now_ms)
  sleep "$IDLE_SECS"
  read -ra idle1 < <(snap)
  idle_secs=$(awk "BEGIN{print ($(now_ms) - $t0)/1000}")
  # Its cursor while it still answers, then it goes offline.
  offline_cursor=$(curl -s "http://127.0.0.1:$((FPORT0 + OFFLINE))/api/sync/status" | jq -r .upstream.cursor)
  stop_follower "$OFFLINE"
  before_lines=()
  for ((i = 0; i < MEASURED; i++)); do before_lines+=("$(lines_of "$i")"); done
  read -ra day0 < <(snap)
  applied0=$(metric "$BASE" 'emis_edge_events_total[{]outcome="applied"')
  t0=$(now_ms)
  "$BIN" gen --scale province --brokers "127.0.0.1:$KPORT" --skip-initial --trickle "$DAY_RATE" \
    --duration-secs $((DAY_CHANGES / DAY_RATE)) >"$W/day.log" 2>&1
  # Until the parent, the school node on Kafka and the followers have it all.
  settled "$BASE"
  settled "http://127.0.0.1:$KSCHOOL_PORT"
  for ((i = 0; i < MEASURED; i++)); do until follower_up "$i"; do sleep 0.05; done; done
  read -ra day1 < <(snap)
  day_secs=$(awk "BEGIN{print ($(now_ms) - $t0)/1000}")
  applied=$(($(metric "$BASE" 'emis_edge_events_total[{]outcome="applied"') - applied0))
  say "## Bytes: a day of changes"
  say ""
  say "A day: $DAY_CHANGES changes of the generator's trickle (teacher and class updates, assignments deleted and re-created) over the 1,000 schools, published at $DAY_RATE/s (${day_secs} s from the first to everything applied everywhere; the parent applied $applied). Bytes received on TCP (kernel tcp_info \`bytes_received\`: payload with HTTP and Kafka headers), and the follower's own \`emis_edge_upstream_bytes_total\` (feed bodies as sent, gzip)."
  say ""
  say "| node | bytes in the day's run | per change of the province | idle: bytes/s ($IDLE_SECS s without changes) |"
  say "|---|---|---|---|"
  kday=$((day1[0] - day0[0]))
  pday=$((day1[1] - day0[1]))
  kidle=$(awk "BEGIN{printf \"%.0f\", (${idle1[0]} - ${idle0[0]})/$idle_secs}")
  pidle=$(awk "BEGIN{printf \"%.0f\", (${idle1[1]} - ${idle0[1]})/$idle_secs}")
  say "| school node on Kafka (one school) | $kday | $(awk "BEGIN{printf \"%.0f\", $kday/$DAY_CHANGES}") | $kidle |"
  say "| provincial node (Kafka) | $pday | $(awk "BEGIN{printf \"%.0f\", $pday/$DAY_CHANGES}") | $pidle |"
  fsum=0
  fmin=
  fmax=0
  for ((i = 0; i < MEASURED; i++)); do
    rx=$((day1[2 + 2 * i] - day0[2 + 2 * i]))
    body=$((day1[3 + 2 * i] - day0[3 + 2 * i]))
    fidle=$(awk "BEGIN{printf \"%.1f\", (${idle1[2 + 2 * i]} - ${idle0[2 + 2 * i]})/$idle_secs}")
    nl=$(($(lines_of "$i") - before_lines[i]))
    say "| school node $i on the feed | $rx (bodies $body; $nl lines) | | $fidle |"
    fsum=$((fsum + rx))
    [[ -n $fmin ]] && ((rx >= fmin)) || fmin=$rx
    ((rx <= fmax)) || fmax=$rx
  done
  fmean=$((fsum / MEASURED))
  say ""
  say "Ratio, school node on the feed / school node on Kafka, same period: **$(awk "BEGIN{printf \"%.5f\", $fmean/$kday}")** (mean of $MEASURED school nodes; $(awk "BEGIN{printf \"%.5f\", $fmin/$kday}")–$(awk "BEGIN{printf \"%.5f\", $fmax/$kday}")); 1/1,000 schools = 0.00100."
  f0idle=$(awk "BEGIN{printf \"%.2f\", (${idle1[2]} - ${idle0[2]})/$idle_secs}")
  say "Over a real day (86,400 s): the day's bytes plus the idle traffic for the rest of it: school node on Kafka $(awk "BEGIN{printf \"%.0f\", $kday + $kidle*(86400-$day_secs)}") bytes, on the feed $(awk "BEGIN{printf \"%.0f\", $fmean + $f0idle*(86400-$day_secs)}") bytes: ratio **$(awk "BEGIN{printf \"%.5f\", ($fmean + $f0idle*(86400-$day_secs))/($kday + $kidle*(86400-$day_secs))}")**."
  say ""
  kill -TERM "$KS"
  wait "$KS" || true

  log "catch-up of the school node that was offline"
  t0=$(now_ms)
  start_follower "$OFFLINE"
  fb=http://127.0.0.1:$((FPORT0 + OFFLINE))
  until follower_up "$OFFLINE"; do sleep 0.005; done
  t1=$(now_ms)
  cbytes=$(metric "$fb" emis_edge_upstream_bytes_total)
  clines=$(metric "$fb" emis_edge_upstream_lines_total)
  cpages=$(metric "$fb" emis_edge_upstream_pages_total)
  crx=$(rx_bytes "${FPIDS[$OFFLINE]}" "$PORT")
  say "## Catch-up: a school node offline during the day ($applied changes applied at the parent)"
  say ""
  say "| from start to caught up | pages | lines | bytes (bodies, gzip) | bytes on TCP | cursor before → after |"
  say "|---|---|---|---|---|---|"
  say "| $((t1 - t0)) ms | $cpages | $clines | $cbytes | $crx | ${offline_cursor:-?} → $(curl -s "$fb/api/sync/status" | jq -r .upstream.cursor) |"
  say ""
fi

if has idle; then
  log "idle: $HOLD long-polls at the parent"
  stop_followers
  hold_rounds() { # title
    say "| round | without: req/s | p50 | p99 | with $HOLD long-polls: req/s | p50 | p99 | p99 ratio | long-poll answers | wrk errors (without / with) | load |"
    say "|---|---|---|---|---|---|---|---|---|---|---|"
    local r hold_secs
    hold_secs=$((${DURATION%s} + 25))
    for ((r = 1; r <= ROUNDS; r++)); do
      read -r n_rps n_p50 n_p99 n_err < <(wrk_run)
      "$FB" hold --url "$BASE" --count "$HOLD" --secs "$hold_secs" --wait 30 >"$W/hold-$1-$r.txt" 2>&1 &
      HP=$!
      PIDS+=("$HP")
      # Until the parent holds them all (or 15 s).
      for _ in $(seq 150); do
        (($(metric "$BASE" 'emis_edge_feed_long_polls$') >= HOLD * 95 / 100)) && break
        sleep 0.1
      done
      held=$(metric "$BASE" 'emis_edge_feed_long_polls$')
      read -r h_rps h_p50 h_p99 h_err < <(wrk_run)
      wait "$HP" || true
      ratio=$(awk "BEGIN{printf \"%.2f\", $(ms_of "$h_p99")/$(ms_of "$n_p99")}")
      f=$W/hold-$1-$r.txt
      say "| $r | $n_rps | $n_p50 | $n_p99 | $h_rps | $h_p50 | $h_p99 | **$ratio** | held $held at the start of wrk; $(kv "$f" answered_with_changes) with changes, $(kv "$f" answered_empty) empty, $(kv "$f" refused_503) refused (503), $(kv "$f" other_status) other, $(kv "$f" failed) failed | $n_err / $h_err | $(load) |"
    done
    say ""
  }
  say "## $HOLD long-polls held by the parent"
  say ""
  say "\`benches/followers.rs hold\`: $HOLD long-poll requests (\`wait=30\`, gzip, one school each, asked again at once when answered), held while \`wrk -t1 -c64 -d$DURATION\` reads; the parent with \`http.max_connections = 2048\`, \`http.max_long_polls = 1100\`."
  say ""
  say "### Parent idle (no changes)"
  say ""
  hold_rounds idle
  say "### $RATE changes/s arriving (each commit is announced to the held long-polls; those of its schools answer)"
  say ""
  "$BIN" gen --scale province --brokers "127.0.0.1:$KPORT" --skip-initial --trickle "$RATE" \
    --duration-secs $((ROUNDS * (2 * ${DURATION%s} + 40) + 30)) >"$W/idle-trickle.log" 2>&1 &
  GEN=$!
  PIDS+=("$GEN")
  sleep 3
  hold_rounds trickle
  kill "$GEN" 2>/dev/null || true
  wait "$GEN" 2>/dev/null || true
  say "Target: no errors, lookup p99 with them ≤ 1.5 × without."
  say ""
fi

if has defaults; then
  log "defaults: the parent with the default http limits, $HOLD long-polls"
  stop_followers
  stop_parent
  parent_config ""
  start_parent
  say "## $HOLD long-polls at a parent with the default limits (max_connections 1024, max_long_polls 512), no changes"
  say ""
  say "| wrk without: req/s | p99 | errors | with: req/s | p99 | errors | long-poll answers |"
  say "|---|---|---|---|---|---|---|"
  read -r n_rps n_p50 n_p99 n_err < <(wrk_run)
  "$FB" hold --url "$BASE" --count "$HOLD" --secs $((${DURATION%s} + 25)) --wait 30 >"$W/hold-defaults.txt" 2>&1 &
  HP=$!
  sleep 10
  read -r h_rps h_p50 h_p99 h_err < <(wrk_run)
  wait "$HP" || true
  f=$W/hold-defaults.txt
  say "| $n_rps | $n_p99 | $n_err | $h_rps | $h_p99 | $h_err | $(kv "$f" answered_empty) empty, $(kv "$f" refused_503) refused (503), $(kv "$f" failed) failed; held at the parent $(kv "$f" parent_held_min)–$(kv "$f" parent_held_max) |"
  say ""
fi

log "results in $RESULTS"
