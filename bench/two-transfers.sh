#!/usr/bin/env bash
# Two file transfers at once through one relay, on the release binaries,
# everything on 127.0.0.1: alice sends to bob and carol to dave (SIZE_MB
# each, 512 by default), each with `send --file --wait`, both recipients
# running `sealpost agent`. Checks that both files arrive intact and
# delivered, and prints the time for both, the relay's peak RSS and what it
# read from its device (the pieces of two streaming uploads share its
# memory of recent pieces), and its pacing metrics.
# Bounded by MAX_SECONDS; loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
SIZE_MB=${SIZE_MB:-512}
MAX_SECONDS=${MAX_SECONDS:-300}
PORT=${PORT:-17990}

cargo build --release --locked -q -p sealpost
SP=$PWD/target/release/sealpost
T=$(mktemp -d /var/tmp/sealpost-two.XXXXXX)
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null && wait "$p" 2>/dev/null; done
    rm -rf "$T"
}
trap cleanup EXIT
export SEALPOST_LOG=warn

start_relay --metrics "127.0.0.1:$((PORT + 1))"
card() { "$SP" --home "$T/$1" --json id | python3 -c 'import json,sys; print(json.load(sys.stdin)["card"])'; }
for u in alice bob carol dave; do "$SP" --home "$T/$u" init --name "$u" --relay "$ADDR" >/dev/null; done
"$SP" --home "$T/alice" contact add "$(card bob)" --name bob >/dev/null
"$SP" --home "$T/bob" contact add "$(card alice)" --name alice >/dev/null
"$SP" --home "$T/carol" contact add "$(card dave)" --name dave >/dev/null
"$SP" --home "$T/dave" contact add "$(card carol)" --name carol >/dev/null
for u in bob dave; do
    mkdir -p "$T/in-$u"
    "$SP" --home "$T/$u" agent --downloads "$T/in-$u" >/dev/null 2>"$T/$u.log" &
    PIDS+=("$!")
    for _ in $(seq 200); do [[ -S $T/$u/agent.sock ]] && break; sleep 0.05; done
done
echo "# writing two ${SIZE_MB} MiB files of random bytes" >&2
head -c "$((SIZE_MB << 20))" /dev/urandom >"$T/a.bin"
head -c "$((SIZE_MB << 20))" /dev/urandom >"$T/c.bin"
sync

t0=$(date +%s.%N)
"$SP" --home "$T/alice" --json send bob --file "$T/a.bin" --wait --timeout "${MAX_SECONDS}s" >"$T/a.json" &
A=$!
"$SP" --home "$T/carol" --json send dave --file "$T/c.bin" --wait --timeout "${MAX_SECONDS}s" >"$T/c.json" &
C=$!
wait "$A"
wait "$C"
t1=$(date +%s.%N)
cmp -s "$T/a.bin" "$T/in-bob/a.bin" || { echo "bob's file differs" >&2; exit 1; }
cmp -s "$T/c.bin" "$T/in-dave/c.bin" || { echo "dave's file differs" >&2; exit 1; }
for j in a c; do
    state=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["deliveries"][0]["state"])' "$T/$j.json")
    [[ $state == delivered ]] || { echo "not delivered: $state" >&2; exit 1; }
done
awk -v mb="$SIZE_MB" -v t0="$t0" -v t1="$t1" 'BEGIN {
    printf "sealpost two_files_%dMiB_both_seconds %.2f s\n", mb, t1 - t0
    printf "sealpost two_files_%dMiB_total_rate %.1f MiB/s\n", mb, 2 * mb / (t1 - t0)
}'
echo "sealpost peak_rss_relay $(( $(awk '/VmHWM/ { print $2 }' "/proc/$RELAY/status") / 1024 )) MiB"
echo "sealpost device_reads_relay $(( $(awk '/^read_bytes/ { print $2 }' "/proc/$RELAY/io") >> 20 )) MiB"
relay_blob_metrics "$((PORT + 1))"
