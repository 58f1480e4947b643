#!/usr/bin/env bash
# Time to restore replication after a bookie loss, and the copy bandwidth, against the write
# bandwidth of `quire bench ledger` in the same run.
#
# Starts 1 metadata node and 4 bookies (fsync on, autorecovery off) on loopback, writes ledgers
# (E=3, Qw=3, Qa=2) with `quire bench ledger` for DURATION, kills -9 one bookie, starts a
# `quire autorecovery` daemon (lost-bookie delay 0, no throttle) and polls its status until no
# ledger is under-replicated. Prints the disk's limits (disk-probe) and one JSON summary.
#
# Usage: benches/scripts/autorecovery.sh [DURATION=10s] [ENTRY_SIZE=16384]
# Needs target/release/quire (cargo build --release -p quire-cli) and python3.
set -euo pipefail
DURATION=${1:-10s}
ENTRY_SIZE=${2:-16384}
BIN=${QUIRE_BIN:-$(pwd)/target/release/quire}
PROBE=${DISK_PROBE:-$(pwd)/../shared/tools/disk-probe}
DIR=$(mktemp -d /tmp/quire-ar-bench.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$DIR"
}
trap cleanup EXIT
export QUIRE_LOG=warn

wait_file() { for _ in $(seq 1 300); do [ -s "$1" ] && return 0; sleep 0.1; done; echo "no $1" >&2; exit 1; }

"$BIN" metadata --id 1 --listen 127.0.0.1:0 --data-dir "$DIR/meta" --addr-file "$DIR/meta.addr" \
    >"$DIR/meta.log" 2>&1 & PIDS+=($!)
wait_file "$DIR/meta.addr"
META="quire://$(head -1 "$DIR/meta.addr")"
"$BIN" metadata init --metadata "$META" >/dev/null
for i in 1 2 3 4; do
    "$BIN" bookie --journal-dir "$DIR/b$i/journal" --ledger-dir "$DIR/b$i/ledgers" \
        --listen 127.0.0.1:0 --http 127.0.0.1:0 --addr-file "$DIR/b$i.addr" --bookie-id "bookie-$i" \
        --metadata "$META" --session-timeout-ms 2000 --no-autorecovery >"$DIR/b$i.log" 2>&1 &
    PIDS+=($!)
    eval "BOOKIE_PID_$i=$!"
    wait_file "$DIR/b$i.addr"
done
sleep 1

PROBE_JSON=$("$PROBE" "$DIR" 2>/dev/null || echo '{}')
WRITE_JSON=$("$BIN" bench ledger --metadata "$META" --ensemble 3 --write-quorum 3 --ack-quorum 2 \
    --entry-size "$ENTRY_SIZE" --in-flight 64 --ledgers 4 --duration "$DURATION" --json)

kill -9 "$BOOKIE_PID_1"
T_KILL=$(date +%s.%N)
"$BIN" autorecovery --metadata "$META" --id bench-ar --lost-bookie-recovery-delay 0s \
    --throttle-bytes-per-sec 0 >"$DIR/ar.log" 2>&1 & PIDS+=($!)

T_MARKED=""
for _ in $(seq 1 6000); do
    S=$("$BIN" autorecovery status --metadata "$META" --json 2>/dev/null || echo '{}')
    N=$(python3 -c 'import json,sys; s=json.loads(sys.argv[1] or "{}"); a=s.get("auditor") or {}; print(s.get("under_replicated",-1), a.get("ledgers_marked",0), s.get("totals",{}).get("ledgers_replicated",0))' "$S")
    read -r UNDER MARKED DONE <<<"$N"
    if [ -z "$T_MARKED" ] && [ "$MARKED" -gt 0 ]; then T_MARKED=$(date +%s.%N); fi
    if [ -n "$T_MARKED" ] && [ "$UNDER" -eq 0 ] && [ "$DONE" -ge "$MARKED" ]; then break; fi
    sleep 0.1
done
T_DONE=$(date +%s.%N)
python3 - "$WRITE_JSON" "$S" "$PROBE_JSON" "$T_KILL" "$T_MARKED" "$T_DONE" <<'PY'
import json, sys
w, s, probe = (json.loads(x) for x in sys.argv[1:4])
t_kill, t_marked, t_done = (float(x) for x in sys.argv[4:7])
t = s["totals"]
copy_s = t_done - t_marked
print(json.dumps({
    "disk": probe,
    "write": {k: w[k] for k in ("entries_per_sec", "mb_per_sec", "entries", "entry_size", "duration_s") if k in w},
    "ledgers_replicated": t["ledgers_replicated"],
    "fragments_replicated": t["fragments_replicated"],
    "entries_replicated": t["entries_replicated"],
    "mb_replicated": round(t["bytes_replicated"] / 1e6, 2),
    "restore_s_from_kill": round(t_done - t_kill, 2),
    "restore_s_from_marking": round(copy_s, 2),
    "copy_mb_per_sec": round(t["bytes_replicated"] / 1e6 / copy_s, 2) if copy_s > 0 else None,
}, indent=2))
PY
