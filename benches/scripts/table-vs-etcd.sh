#!/usr/bin/env bash
# Table puts against etcd puts, same workload, same machine, same disk, in one run.
#
# Runs, one after the other (never two at once), on loopback with every data directory under
# one temporary directory:
#   1. `quire standalone` (embedded metadata store, 3 bookies with journal fsync on, the
#      stream-table server): `quire bench table --op OP` on a table of RANGES ranges, whose
#      changelogs are E=3/Qw=3/Qa=2 ledgers;
#   2. a 1-node etcd 3.4 cluster, then 3. a 3-node etcd cluster (each member fsyncs its WAL,
#      as each bookie fsyncs its journal: replication compared like for like):
#      `quire bench table --etcd ... --op OP` with the same flags.
# Each bench runs a 1 s warm-up, then DURATION measured. Prints disk-probe's figures and one JSON
# summary with the three results and table/etcd ratios.
#
# Usage: benches/scripts/table-vs-etcd.sh [DURATION=10s] [CONCURRENCY=16] [VALUE_SIZE=256]
# Env: OP (put|get, default put), KEYS (10000), RANGES (4), QUIRE_BIN (target/release/quire),
#      ETCD_BIN (/usr/bin/etcd), DISK_PROBE (../shared/tools/disk-probe).
# Needs target/release/quire (cargo build --release -p quire-cli), etcd 3.4 and python3.
set -euo pipefail
DURATION=${1:-10s}
CONCURRENCY=${2:-16}
VALUE_SIZE=${3:-256}
OP=${OP:-put}
KEYS=${KEYS:-10000}
RANGES=${RANGES:-4}
BIN=${QUIRE_BIN:-$(pwd)/target/release/quire}
ETCD=${ETCD_BIN:-/usr/bin/etcd}
PROBE=${DISK_PROBE:-$(pwd)/../shared/tools/disk-probe}
DIR=$(mktemp -d /tmp/quire-table-etcd.XXXXXX)
PIDS=()
# Every process this run started names $DIR on its command line: the ones in PIDS, and any other
# (a safety net, so that nothing outlives the run).
leftovers() { pgrep -f -- "$DIR/" 2>/dev/null | grep -vx "$$" || true; }
cleanup() {
    for p in "${PIDS[@]}" $(leftovers); do kill -9 "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$DIR"
}
trap cleanup EXIT
export QUIRE_LOG=warn

wait_file() { for _ in $(seq 1 600); do [ -s "$1" ] && return 0; sleep 0.1; done; echo "no $1" >&2; exit 1; }
# Stops the processes started so far (SIGTERM, then SIGKILL after 20 s).
stop_all() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do
        for _ in $(seq 1 200); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    for p in $(leftovers); do kill -9 "$p" 2>/dev/null || true; done
    PIDS=()
}
# N free loopback ports.
free_ports() {
    python3 - "$1" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}
wait_etcd() {  # client port
    for _ in $(seq 1 300); do
        if python3 -c 'import json,sys,urllib.request; h=json.load(urllib.request.urlopen("http://127.0.0.1:%s/health" % sys.argv[1], timeout=1)); sys.exit(0 if h.get("health") == "true" else 1)' "$1" 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    echo "etcd on port $1 is not healthy" >&2
    exit 1
}
# Starts an etcd cluster of N members; sets ENDPOINTS to its client endpoints, comma-separated.
start_etcd() {
    local n=$1 name=$2 ports cluster="" endpoints="" i
    read -r -a ports <<<"$(free_ports $((2 * n)))"
    for i in $(seq 1 "$n"); do
        cluster+="${cluster:+,}$name-$i=http://127.0.0.1:${ports[$((2 * i - 1))]}"
    done
    for i in $(seq 1 "$n"); do
        local client=${ports[$((2 * i - 2))]} peer=${ports[$((2 * i - 1))]}
        "$ETCD" --name "$name-$i" --data-dir "$DIR/$name-$i" \
            --listen-client-urls "http://127.0.0.1:$client" --advertise-client-urls "http://127.0.0.1:$client" \
            --listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
            --initial-cluster "$cluster" --initial-cluster-state new --initial-cluster-token "$name" \
            --logger zap --log-level warn >"$DIR/$name-$i.log" 2>&1 &
        PIDS+=($!)
        endpoints+="${endpoints:+,}127.0.0.1:$client"
    done
    for i in $(seq 1 "$n"); do wait_etcd "${ports[$((2 * i - 2))]}"; done
    ENDPOINTS=$endpoints
}

BENCH_FLAGS=(--op "$OP" --keys "$KEYS" --value-size "$VALUE_SIZE" --concurrency "$CONCURRENCY"
    --duration "$DURATION" --warmup 1s --json)

PROBE_JSON=$("$PROBE" "$DIR" 2>/dev/null || echo '{}')

# 1. Quire: everything in one process.
"$BIN" standalone --data-dir "$DIR/quire" --addr-file "$DIR/quire.json" \
    --metadata-listen 127.0.0.1:0 --api-listen 127.0.0.1:0 \
    --bookie-listen-base 127.0.0.1:0 --bookie-http-base 127.0.0.1:0 >"$DIR/quire.log" 2>&1 &
PIDS+=($!)
wait_file "$DIR/quire.json"
SERVER=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["stream_table"])' "$DIR/quire.json")
TABLE_JSON=$("$BIN" bench table --server "$SERVER" --ranges "$RANGES" --table bench/t1 "${BENCH_FLAGS[@]}")
stop_all

# 2. etcd, one member.
start_etcd 1 etcd1
ETCD1_JSON=$("$BIN" bench table --etcd "$ENDPOINTS" "${BENCH_FLAGS[@]}")
stop_all

# 3. etcd, three members.
start_etcd 3 etcd3
ETCD3_JSON=$("$BIN" bench table --etcd "$ENDPOINTS" "${BENCH_FLAGS[@]}")
stop_all

python3 - "$PROBE_JSON" "$TABLE_JSON" "$ETCD1_JSON" "$ETCD3_JSON" <<'PY'
import json, sys
probe, table, etcd1, etcd3 = (json.loads(x) for x in sys.argv[1:5])
keys = ("ops_per_sec", "p50_us", "p99_us", "p999_us", "max_us", "ops", "errors")
pick = lambda r: {k: r.get(k) for k in keys}
ratio = lambda a, b: round(a / b, 3) if b else None
print(json.dumps({
    "disk": probe,
    "workload": {k: table.get(k) for k in ("op", "keys", "value_size", "concurrency", "duration_s")},
    "quire_table": dict(pick(table), setup="quire standalone: 3 bookies (fsync on), E=3/Qw=3/Qa=2 changelogs"),
    "etcd_1_node": pick(etcd1),
    "etcd_3_nodes": pick(etcd3),
    "table_vs_etcd_3": {
        "ops_per_sec_ratio": ratio(table["ops_per_sec"], etcd3["ops_per_sec"]),
        "p99_ratio": ratio(table["p99_us"], etcd3["p99_us"]),
    },
    "table_vs_etcd_1": {
        "ops_per_sec_ratio": ratio(table["ops_per_sec"], etcd1["ops_per_sec"]),
        "p99_ratio": ratio(table["p99_us"], etcd1["p99_us"]),
    },
}, indent=2))
PY
