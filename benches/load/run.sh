#!/usr/bin/env bash
# Load tests of a real emis-edge node (issue #5), rerunnable by anyone:
#
#   benches/load/run.sh                      # province scale, every step
#   SCALE=national STEPS="import read restart" benches/load/run.sh
#   SCALE=demo benches/load/run.sh           # a quick try (seconds)
#
# Steps (STEPS, default all but `national` ones):
#   import   generate the data set (emis-edge gen) and import it offline:
#            time and store size
#   read     wrk -t1 -c64 on GET /api/teachers/{random real id}, on a
#            static body of the same size from plain axum (the ceiling) and
#            from the node's own HTTP stack (benches/static_http.rs),
#            interleaved for ROUNDS (default 3) rounds; then the design
#            document's `ab -n 10000 -c 100`; resident memory of `serve`
#   restart  SIGTERM, start, time until /health/ready answers 200 (3 times)
#   mixed    the read load while `emis-edge gen --trickle 1000` publishes
#            1,000 changes/s through tansu to the node
#   pg       the design document's alternative: the three-query lookup on
#            PostgreSQL with the same data, pgbench -M prepared -c 64
#
# Needs: wrk, ab (apache2-utils), curl; tansu for `mixed` (cargo install
# tansu --locked --features dynostore); PostgreSQL server binaries for `pg`
# (package postgresql). Missing tools skip their step with a note.
# Results: $OUT/results.md (default target/load/$SCALE/results.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=benches/load/lib.sh
. benches/load/lib.sh

SCALE=${SCALE:-province}
STEPS=${STEPS:-"import read restart mixed pg"}
DURATION=${DURATION:-10s}
CACHE_MB=${CACHE_MB:-64}
OUT=${OUT:-target/load/$SCALE}
PORT=${PORT:-18080}
STATIC_PORT=${STATIC_PORT:-18090}
PLAIN_PORT=${PLAIN_PORT:-18091}
ROUNDS=${ROUNDS:-3}
BIN=target/release/emis-edge
mkdir -p "$OUT"
RESULTS=$OUT/results.md
W=$OUT/work
mkdir -p "$W"

has() { [[ " $STEPS " == *" $1 "* ]]; }
now_ms() { date +%s%3N; }
PIDS=()
PG_STOP=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  [[ ${#PG_STOP[@]} -eq 0 ]] || "${PG_STOP[@]}" >/dev/null 2>&1 || true
  wait 2>/dev/null || true
}
trap cleanup EXIT

log "building the release binaries and the static-body server"
build_release
cargo bench --no-run --quiet --bench static_http 2>/dev/null
STATIC_BIN=$(ls -t target/release/deps/static_http-* | grep -v '\.d$' | head -1)

: >"$RESULTS"
say "# Load test, scale \`$SCALE\`, $(date -u +%FT%TZ)"
say ""
say "Machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB; \`$BIN\` $(git rev-parse --short HEAD 2>/dev/null || echo '?'); store.cache_mb = $CACHE_MB"
say ""

cat >"$W/edge.toml" <<EOF
[node]
id = "load-$SCALE"
data_dir = "$W/data"
[http]
listen = "127.0.0.1:$PORT"
[schools]
all = true
[store]
cache_mb = $CACHE_MB
[log]
level = "warn"
EOF
BASE=http://127.0.0.1:$PORT

NODE=
start_node() {
  "$BIN" serve --config "$W/edge.toml" 2>>"$W/serve.log" &
  NODE=$!
  PIDS+=("$NODE")
  until curl -sf -o /dev/null "$BASE/health/ready"; do sleep 0.01; done
}
stop_node() {
  [[ -n $NODE ]] || return 0
  kill -TERM "$NODE"
  wait "$NODE" || true
  NODE=
}
# Until the node's worker has rendered every teacher document.
wait_docs() {
  until curl -s "$BASE/api/sync/status" | grep -q '"pendingDocuments":0[,}]'; do sleep 0.2; done
}
load1() { cut -d' ' -f1 /proc/loadavg; }
# wrk's latency ("812.00us", "1.20ms", "2.00s") in ms
ms() { awk '{v=$1; if (v ~ /us$/) printf "%.4f", v/1000; else if (v ~ /ms$/) printf "%.4f", v+0; else printf "%.4f", v*1000}' <<<"$1"; }
# min / median / max of numbers
mmm() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END{printf "%s× / %s× / %s×", a[1], a[int((NR+1)/2)], a[NR]}'; }
# Until the freshness worker's first walk over the store (at start) is
# done: it would share the CPU with the first measurement.
wait_fresh() {
  until curl -s "$BASE/api/sync/status" | grep -Eq '"name":"freshness","state":"[a-z]+","steps":[1-9]'; do sleep 0.2; done
}
rss_mb() { awk '/VmRSS/{printf "%.0f", $2/1024}' "/proc/$1/status"; }

# Clock ticks of CPU (user + system) a process has used so far.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# wrk against the server with PID $1 (the rest: wrk's arguments) →
# "req/s p50 p99 CPU-µs-per-request errors". CPU time per request is a
# figure less bent by other load on the machine than requests/s.
wrk_run() {
  local pid=$1
  shift
  local out before after
  before=$(ticks "$pid")
  out=$(wrk -t1 -c64 -d"$DURATION" --latency "$@")
  after=$(ticks "$pid")
  echo "$out" >>"$W/wrk.log"
  local rps p50 p99 n cpu errs
  rps=$(awk '/Requests\/sec/{print $2}' <<<"$out")
  n=$(awk '/requests in/{print $1}' <<<"$out")
  cpu=$(awk "BEGIN{printf \"%.1f\", ($after - $before) * 1e6 / $(getconf CLK_TCK) / $n}")
  p50=$(awk '$1=="50%"{print $2}' <<<"$out")
  p99=$(awk '$1=="99%"{print $2}' <<<"$out")
  errs=$(awk '/Non-2xx/{print $5} /Socket errors/{print "socket:" $0}' <<<"$out" | tr '\n' ' ')
  echo "$rps $p50 $p99 $cpu ${errs:-0}"
}

if has import || [[ ! -f $W/data/emis-edge.redb ]]; then
  rm -rf "$W/data" "$W/snapshot.ndjson"
  log "generating the $SCALE data set"
  t0=$(now_ms)
  "$BIN" gen --scale "$SCALE" --out "$W/snapshot.ndjson" --teacher-ids "$W/ids.txt" 2>>"$W/gen.log"
  t1=$(now_ms)
  records=$(($(wc -l <"$W/snapshot.ndjson") - $(grep -c '"kind":"end"' "$W/snapshot.ndjson")))
  log "importing $records records"
  t2=$(now_ms)
  "$BIN" import --config "$W/edge.toml" "$W/snapshot.ndjson" >"$W/import.log" 2>&1
  t3=$(now_ms)
  size=$(stat -c %s "$W/data/emis-edge.redb")
  say "## Import"
  say ""
  say "| records | snapshot file | generate | import | import rate | store file |"
  say "|---|---|---|---|---|---|"
  say "| $records | $(($(stat -c %s "$W/snapshot.ndjson") >> 20)) MiB | $(((t1 - t0) / 1000)) s | $(awk "BEGIN{printf \"%.1f\", ($t3-$t2)/1000}") s | $(awk "BEGIN{printf \"%.0f\", $records/(($t3-$t2)/1000)}")/s | $((size >> 20)) MiB |"
  say ""
  rm -f "$W/snapshot.ndjson"
fi

if has read; then
  start_node
  wait_docs
  wait_fresh
  say "## Reads (wrk -t1 -c64 -d$DURATION, random real teacher ids)"
  say ""
  # The average size of a teacher detail, for the static comparison.
  bytes=$(head -200 "$W/ids.txt" | while read -r id; do curl -s -o /dev/null -w '%{size_download}\n' "$BASE/api/teachers/$id"; done | awk '{s+=$1} END{printf "%d", s/NR}')
  # The baselines, same body size: plain axum (`axum::serve`, one route, no
  # layers: the issue's ceiling) and the node's own HTTP stack (its layers
  # and connection loop, no store).
  "$STATIC_BIN" --plain --bytes "$bytes" --listen "127.0.0.1:$PLAIN_PORT" 2>>"$W/static.log" &
  PLAIN_PID=$!
  PIDS+=("$PLAIN_PID")
  "$STATIC_BIN" --bytes "$bytes" --listen "127.0.0.1:$STATIC_PORT" 2>>"$W/static.log" &
  STACK_PID=$!
  PIDS+=("$STACK_PID")
  until curl -sf -o /dev/null "http://127.0.0.1:$STATIC_PORT/api/static" &&
    curl -sf -o /dev/null "http://127.0.0.1:$PLAIN_PORT/api/static"; do sleep 0.01; done
  PLAIN_URL=http://127.0.0.1:$PLAIN_PORT/api/static
  STACK_URL=http://127.0.0.1:$STATIC_PORT/api/static
  wrk_run "$PLAIN_PID" "$PLAIN_URL" >/dev/null # warm-ups
  wrk_run "$STACK_PID" "$STACK_URL" >/dev/null
  wrk_run "$NODE" -s benches/load/teacher.lua "$BASE" -- "$W/ids.txt" >/dev/null
  # Interleaved rounds (plain, teacher, stack, …), so that the other load on
  # a shared machine hits all three alike; ratios are per round.
  say "| round | load (1 min) | plain axum req/s | p99 | CPU/req | same stack req/s | p99 | CPU/req | teacher route req/s | p50 | p99 | CPU/req | non-2xx | teacher/plain req/s | p99 | teacher/stack req/s |"
  say "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
  R_RPS=() R_P99=() S_RPS=()
  for round in $(seq 1 "$ROUNDS"); do
    read -r p_rps _ p_p99 p_cpu _ < <(wrk_run "$PLAIN_PID" "$PLAIN_URL")
    read -r t_rps t_p50 t_p99 t_cpu t_err < <(wrk_run "$NODE" -s benches/load/teacher.lua "$BASE" -- "$W/ids.txt")
    read -r s_rps _ s_p99 s_cpu _ < <(wrk_run "$STACK_PID" "$STACK_URL")
    r_rps=$(awk "BEGIN{printf \"%.2f\", $t_rps/$p_rps}")
    r_p99=$(awk "BEGIN{printf \"%.2f\", $(ms "$t_p99")/$(ms "$p_p99")}")
    r_s=$(awk "BEGIN{printf \"%.2f\", $t_rps/$s_rps}")
    R_RPS+=("$r_rps") R_P99+=("$r_p99") S_RPS+=("$r_s")
    say "| $round | $(load1) | $p_rps | $p_p99 | $p_cpu µs | $s_rps | $s_p99 | $s_cpu µs | $t_rps | $t_p50 | $t_p99 | $t_cpu µs | $t_err | $r_rps× | $r_p99× | $r_s× |"
  done
  say ""
  say "Body $bytes B. Teacher route / plain axum, min / median / max over $ROUNDS rounds: requests/s **$(mmm "${R_RPS[@]}")** (target ≥ 0.8×), p99 **$(mmm "${R_P99[@]}")** (target ≤ 1.2×); teacher route / the same stack's static body: $(mmm "${S_RPS[@]}")."
  say ""
  id=$(head -1 "$W/ids.txt")
  ab -n 10000 -c 100 "$BASE/api/teachers/$id" >"$W/ab.log" 2>&1
  failed=$(awk '/Failed requests/{print $3}' "$W/ab.log")
  non2xx=$(awk '/Non-2xx/{print $3}' "$W/ab.log")
  mean=$(awk '/Time per request/ && /mean\)/{print $4; exit}' "$W/ab.log")
  p99=$(awk '$1=="99%"{print $2}' "$W/ab.log")
  abrps=$(awk '/Requests per second/{print $4}' "$W/ab.log")
  say "## ab -n 10000 -c 100 (the design document's test)"
  say ""
  say "| requests/s | mean | p99 | failed | non-2xx |"
  say "|---|---|---|---|---|"
  say "| $abrps | $mean ms | $p99 ms | $failed | ${non2xx:-0} |"
  say ""
  say "Target: 0 errors, p99 ≤ 10 ms (the design document's bar: mean < 50 ms, p99 < 100 ms)."
  say ""
  say "Resident memory of \`serve\` after the read load: **$(rss_mb "$NODE") MiB** (store.cache_mb = $CACHE_MB)."
  say ""
  stop_node
fi

if has restart; then
  say "## Restart to ready"
  say ""
  times=()
  for _ in 1 2 3; do
    start_node
    stop_node
    t0=$(now_ms)
    start_node
    t1=$(now_ms)
    times+=("$((t1 - t0)) ms")
    stop_node
  done
  say "SIGTERM, then \`serve\` until \`/health/ready\` answers 200: ${times[*]} (target ≤ 1 s; no replay, the store is the state)."
  say ""
fi

if has mixed; then
  if ! have_tansu; then
    say "## Mixed: skipped (no tansu: not on PATH, in ~/.cargo/bin or EMIS_EDGE_TANSU)"
  else
    kport=$((PORT + 2))
    start_tansu "$kport" "$W/tansu.log"
    # A copy of the imported store: the broker is new, and a store that
    # consumed an earlier run's topics would (rightly) read them as recreated.
    rm -rf "$W/data-mixed"
    cp -r --reflink=auto "$W/data" "$W/data-mixed"
    EMIS_EDGE__KAFKA__BROKERS=127.0.0.1:$kport EMIS_EDGE__NODE__DATA_DIR=$W/data-mixed start_node
    wait_docs
    "$BIN" gen --scale "$SCALE" --brokers "127.0.0.1:$kport" --skip-initial --trickle 1000 --duration-secs 40 >"$W/trickle.log" 2>&1 &
    GEN=$!
    PIDS+=("$GEN")
    sleep 5
    before=$(curl -s "$BASE/metrics" | awk '/^emis_edge_events_total/{s+=$2} END{print s+0}')
    read -r m_rps m_p50 m_p99 _ m_err < <(wrk_run "$NODE" -s benches/load/teacher.lua "$BASE" -- "$W/ids.txt")
    after=$(curl -s "$BASE/metrics" | awk '/^emis_edge_events_total/{s+=$2} END{print s+0}')
    wait "$GEN" || true
    say "## Mixed: reads while 1,000 changes/s arrive through tansu"
    say ""
    say "| requests/s | p50 | p99 | non-2xx | events applied during the read run |"
    say "|---|---|---|---|---|"
    say "| $m_rps | $m_p50 | $m_p99 | $m_err | $((after - before)) |"
    say ""
    say "Target: read p99 ≤ 5 ms."
    say ""
    stop_node
    rm -rf "$W/data-mixed"
  fi
fi

if has pg; then
  PGBIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
  if [[ -z $PGBIN ]] || ! command -v pgbench >/dev/null; then
    say "## PostgreSQL: skipped (no PostgreSQL server binaries)"
  else
    log "PostgreSQL: loading the same data set"
    PGDIR=$(mktemp -d /tmp/emis-pg.XXXXXX)
    chmod 755 "$PGDIR"
    RUNAS=()
    [[ $(id -u) == 0 ]] && { chown postgres "$PGDIR"; RUNAS=(runuser -u postgres --); }
    "${RUNAS[@]}" "$PGBIN/initdb" -D "$PGDIR/data" -A trust -U emis >/dev/null
    pgport=$((PORT + 3))
    "${RUNAS[@]}" "$PGBIN/pg_ctl" -D "$PGDIR/data" -l "$PGDIR/log" -o "-p $pgport -k $PGDIR -c shared_buffers=256MB -c max_connections=200" -w start >/dev/null
    PG_STOP=("${RUNAS[@]}" "$PGBIN/pg_ctl" -D "$PGDIR/data" -m immediate stop)
    PSQL=(psql -h "$PGDIR" -p "$pgport" -U emis -d postgres -v ON_ERROR_STOP=1 -q)
    # The same data as the node holds, from the same generator and seed.
    "$BIN" gen --scale "$SCALE" --out "$W/pg.ndjson" 2>/dev/null
    python3 benches/load/snapshot_to_csv.py "$W/pg.ndjson" "$W"
    rm -f "$W/pg.ndjson"
    "${PSQL[@]}" -f benches/load/pg_schema.sql
    for t in teachers classes assignments; do
      "${PSQL[@]}" -c "\\copy $t FROM '$W/$t.csv' WITH (FORMAT csv)"
    done
    "${PSQL[@]}" -c "CREATE INDEX ON assignments (teacher_id)"
    "${PSQL[@]}" -c "VACUUM ANALYZE"
    n=$(wc -l <"$W/teachers.csv")
    sed "s/:teachers/$n/" benches/load/pg_lookup.sql >"$W/pg_lookup.sql"
    PGPASSWORD= pgbench -h "$PGDIR" -p "$pgport" -U emis -n -M prepared -c 64 -j 1 -T 5 -f "$W/pg_lookup.sql" postgres >/dev/null 2>&1 # warm-up
    PGPASSWORD= pgbench -h "$PGDIR" -p "$pgport" -U emis -n -M prepared -c 64 -j 1 -T "${DURATION%s}" -r -f "$W/pg_lookup.sql" postgres >"$W/pgbench.log" 2>&1
    "${RUNAS[@]}" "$PGBIN/pg_ctl" -D "$PGDIR/data" -m fast stop >/dev/null
    PG_STOP=()
    rm -rf "$PGDIR" "$W"/*.csv
    tps=$(awk '/^tps/{print $3; exit}' "$W/pgbench.log")
    lat=$(awk '/latency average/{print $4}' "$W/pgbench.log")
    say "## PostgreSQL, the three-query lookup (pgbench -M prepared -c 64 -j 1 -T ${DURATION%s})"
    say ""
    say "| lookups/s | mean latency |"
    say "|---|---|"
    say "| $tps | $lat ms |"
    say ""
    if [[ -n ${t_rps:-} ]]; then
      say "emis-edge answers **$(awk "BEGIN{printf \"%.1f\", $t_rps/$tps}")×** the lookups per second of PostgreSQL on the same machine (over HTTP with JSON, against PostgreSQL's binary protocol without JSON)."
      say ""
    fi
  fi
fi

log "results in $RESULTS"
cat "$RESULTS" >&2
