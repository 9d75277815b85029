#!/usr/bin/env bash
# `sealpost relay migrate`: a single relay's store moved into a throwaway
# PostgreSQL and Garage (S3) on 127.0.0.1, timed, with its CPU and peak
# RSS, beside Garage's own PUT rate in the same sitting (the bound for the
# blob bytes). The relay holds COUNT 1 KiB items (from `relay load`) and
# one SIZE_MB MiB file Alice sent Bob (Bob never runs).
# A second run (already finished: it only checks) is timed too.
#
#   bench/migrate.sh                      # COUNT=100000 SIZE_MB=1024
#   COUNT=10000 SIZE_MB=64 bench/migrate.sh
#
# Output: "<system> <figure> <value> <unit>" lines. Loopback only;
# bounded by MAX_SECONDS per step.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
COUNT=${COUNT:-100000}
SIZE_MB=${SIZE_MB:-1024}
MAX_SECONDS=${MAX_SECONDS:-900}
PORT=${PORT:-17743}
if [[ -z ${SP:-} ]]; then
    cargo build --release --locked -q -p sealpost --features test-tools
    SP=$PWD/target/release/sealpost
fi
T=$(mktemp -d /var/tmp/sealpost-migrate-bench.XXXXXX)
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null && wait "$p" 2>/dev/null; done
    stop_postgres
    [[ ${KEEP:-0} == 1 ]] || rm -rf "$T"
}
trap cleanup EXIT
export SEALPOST_LOG=${SEALPOST_LOG:-warn}
now() { date +%s.%N; }

start_relay
echo "# filling the relay: $COUNT items of 1 KiB, one ${SIZE_MB} MiB file" >&2
"$SP" --json relay load --address "$ADDR" --count "$COUNT" --size 1024 --clients 16 \
    --window 32 --max-seconds "$MAX_SECONDS" >/dev/null
A=(--home "$T/alice")
B=(--home "$T/bob")
"$SP" "${A[@]}" init --name alice --relay "$ADDR" >/dev/null
"$SP" "${B[@]}" init --name bob --relay "$ADDR" >/dev/null
card() { "$SP" "$@" --json id | python3 -c 'import json,sys; print(json.load(sys.stdin)["card"])'; }
"$SP" "${A[@]}" contact add "$(card "${B[@]}")" --name bob >/dev/null
head -c $((SIZE_MB << 20)) /dev/urandom >"$T/file.bin"
timeout "$MAX_SECONDS" "$SP" "${A[@]}" send bob --file "$T/file.bin" >/dev/null
rm -f "$T/file.bin"
kill "$RELAY"; wait "$RELAY" 2>/dev/null || true
echo "sealpost store_db $(du -sm "$T/relay/store/relay.db" | cut -f1) MiB"
echo "sealpost store_blobs $(du -sm "$T/relay/store/blobs" | cut -f1) MiB"

start_postgres
start_garage
BLOBS="s3://sealpost?endpoint=$S3_ENDPOINT&region=garage"
sync
echo "# migrating, loadavg $(cut -d' ' -f1-3 /proc/loadavg)" >&2
t0=$(now)
timeout "$MAX_SECONDS" /usr/bin/time -f "%M %U %S" -o "$T/migrate.time" \
    "$SP" --json relay migrate --data "$T/relay" --to "$PG_URL" --blobs "$BLOBS" >"$T/migrate.json"
t1=$(now)
python3 - "$T/migrate.json" "$T/migrate.time" "$t0" "$t1" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
rss, user, sys_ = open(sys.argv[2]).read().split()[-3:]
secs = float(sys.argv[4]) - float(sys.argv[3])
print(f"sealpost migrate_seconds {secs:.1f} s")
print(f"sealpost migrate_items {r['items']} items")
print(f"sealpost migrate_blob_bytes {r['blob_bytes']} bytes")
print(f"sealpost migrate_cpu {float(user) + float(sys_):.1f} s")
print(f"sealpost migrate_peak_rss {int(rss) // 1024} MiB")
PY
t0=$(now)
timeout "$MAX_SECONDS" "$SP" --json relay migrate --data "$T/relay" --to "$PG_URL" --blobs "$BLOBS" >"$T/again.json"
t1=$(now)
grep -q '"already_done":true' "$T/again.json"
LC_ALL=C awk -v a="$t0" -v b="$t1" 'BEGIN { printf "sealpost migrate_check_again_seconds %.1f s\n", b - a }'
s3_rates "$SIZE_MB"
