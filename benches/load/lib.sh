# Shared by run.sh and soak.sh (sourced, not run).

# log: a timestamped progress line on stderr. say: a line of the results
# file ($RESULTS), echoed.
log() { printf '%s  %s\n' "$(date +%T)" "$*" >&2; }
say() { printf '%s\n' "$*" | tee -a "$RESULTS"; }

# build_release: the node and the test broker (target/release/emis-edge and
# target/release/test-broker, from tests/support) in one build, so that they
# share one feature set of their dependencies (librdkafka is built once).
build_release() { cargo build --release --quiet --workspace --bins; }

# have_tansu: whether the test broker finds tansu (EMIS_EDGE_TANSU, PATH or
# ~/.cargo/bin). After build_release.
have_tansu() { target/release/test-broker --which >/dev/null 2>&1; }

# start_tansu PORT LOG: starts the test broker (tests/support): tansu with
# in-memory storage on 127.0.0.1:PORT and the nine contract topics,
# 3 partitions each. Returns once the topics exist; appends its pid to PIDS
# (a TERM stops tansu too). Its log and tansu's go to LOG.
# tansu 0.6.0's known faults (docs/HARDENING.md, "Testing against tansu"): a
# fetch from an offset inside a record batch starts at the next batch, and
# the latest offset it reports is the last batch's base + 1. A script that
# restarts a node against it must produce one record per batch
# (batch.num.messages=1); run.sh and soak.sh start their node once.
start_tansu() {
  local port=$1 logfile=$2 ready pid
  ready=$(mktemp)
  target/release/test-broker --port "$port" --partitions 3 >"$ready" 2>"$logfile" &
  pid=$!
  PIDS+=("$pid")
  until [[ -s $ready ]]; do
    if ! kill -0 "$pid" 2>/dev/null; then
      rm -f "$ready"
      log "the test broker did not start; see $logfile"
      exit 1
    fi
    sleep 0.05
  done
  rm -f "$ready"
}
