#!/usr/bin/env bash
# A file from `sealpost send --file` to a verified receipt, on the release
# binaries, everything on 127.0.0.1: a relay, Bob's `sealpost agent`, and
# Alice's `send --file --wait` (which runs her delivery engine until Bob's
# receipt is verified).
#
#   bench/file-transfer.sh                     # SIZE_MB=1024
#   ANCHORS=1 bench/file-transfer.sh           # also ../shared/bench/anchors/nncp.sh
#                                              # (same SIZE_MB) and limits.sh
#   PAD=1 EXTRA_BYTES=1 bench/file-transfer.sh # send --pad; the file is
#                                              # SIZE_MB MiB + EXTRA_BYTES
#   CLUSTER=1 bench/file-transfer.sh          # the relay on PostgreSQL with
#                                              # blobs in Garage (S3), both
#                                              # throwaway; prints Garage's
#                                              # own PUT/GET rates as the bound
#   TWO_RELAYS=1 FORWARD=off|on bench/file-transfer.sh
#                                              # alice's relay on 127.0.0.2,
#                                              # bob's on 127.0.0.3; on: the
#                                              # file goes through alice's
#                                              # relay (PROTOCOL 6.8), off:
#                                              # alice uploads to bob's
#
# Stages, timed by watching the files: queue (Alice hashes the file as a
# blob), upload (until the relay's blob file is whole; each 1 MiB piece is
# fsync'd there before it is acknowledged), download + read-back (until the
# file appears under its final name in Bob's download directory: it was
# fsync'd, dropped from the page cache, read back and its BLAKE3 checked),
# receipt (until `send --wait` returns with Bob's verified receipt).
# Peak RSS of each process from /proc (VmHWM) or time(1).
# Output: "<system> <figure> <value> <unit>" lines, then "ratio" lines.
# Bounded by MAX_SECONDS; loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
SIZE_MB=${SIZE_MB:-1024}
MAX_SECONDS=${MAX_SECONDS:-600}
PORT=${PORT:-17643}
ANCHORS=${ANCHORS:-0}
PAD=${PAD:-0}
EXTRA_BYTES=${EXTRA_BYTES:-0}
TWO_RELAYS=${TWO_RELAYS:-0}
FORWARD=${FORWARD:-off}
CLUSTER=${CLUSTER:-0}

# SP=/path/to/sealpost measures that binary instead (before/after pairs).
if [[ -z ${SP:-} ]]; then
    cargo build --release --locked -q -p sealpost
    SP=$PWD/target/release/sealpost
fi
T=$(mktemp -d /var/tmp/sealpost-file-bench.XXXXXX)
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

# The relay whose blob file is watched: where alice uploads.
BLOB_RELAY=relay
if [[ $TWO_RELAYS == 1 ]]; then
    relay_at "$T/relay" 127.0.0.2 "$PORT" --metrics "127.0.0.1:$((PORT + 1))"
    ADDR=$AT
    RELAY_A=$RELAY
    relay_at "$T/relay-b" 127.0.0.3 "$((PORT + 2))" --metrics "127.0.0.1:$((PORT + 3))"
    ADDR_B=$AT
    RELAY_B=$RELAY
    [[ $FORWARD == on ]] || BLOB_RELAY=relay-b
    echo "# alice's relay at $ADDR, bob's at $ADDR_B, forwarding $FORWARD" >&2
elif [[ $CLUSTER == 1 ]]; then
    start_postgres
    start_garage
    start_relay --metrics "127.0.0.1:$((PORT + 1))" --database "$PG_URL" \
        --blobs "s3://sealpost?endpoint=$S3_ENDPOINT&region=garage"
    ADDR_B=$ADDR
    RELAY_A=$RELAY
else
    start_relay --metrics "127.0.0.1:$((PORT + 1))"
    ADDR_B=$ADDR
    RELAY_A=$RELAY
fi
A=(--home "$T/alice")
B=(--home "$T/bob")
"$SP" "${A[@]}" init --name alice --relay "$ADDR" >/dev/null
"$SP" "${B[@]}" init --name bob --relay "$ADDR_B" >/dev/null
card() { "$SP" "$@" --json id | python3 -c 'import json,sys; print(json.load(sys.stdin)["card"])'; }
"$SP" "${A[@]}" contact add "$(card "${B[@]}")" --name bob >/dev/null
"$SP" "${B[@]}" contact add "$(card "${A[@]}")" --name alice >/dev/null
mkdir -p "$T/incoming"
"$SP" "${A[@]}" sync --forward "$FORWARD" >/dev/null
"$SP" "${B[@]}" agent --forward "$FORWARD" --downloads "$T/incoming" >/dev/null 2>"$T/bob.log" &
BOB=$!
PIDS+=("$BOB")
for _ in $(seq 200); do [[ -S $T/bob/agent.sock ]] && break; sleep 0.05; done

echo "# writing a ${SIZE_MB} MiB file of random bytes" >&2
SIZE=$(( (SIZE_MB << 20) + EXTRA_BYTES ))
head -c "$SIZE" /dev/urandom >"$T/file.bin"
sync
PAD_ARG=()
PLAIN=$SIZE
if [[ $PAD == 1 ]]; then
    PAD_ARG=(--pad)
    # PROTOCOL 5.2: the blob's plaintext is padme(size).
    PLAIN=$(python3 -c 'import sys
L = int(sys.argv[1])
if L < 2: print(L)
else:
    e = L.bit_length() - 1; s = e.bit_length(); m = (1 << (e - s)) - 1
    print((L + m) & ~m)' "$SIZE")
    echo "# --pad: $SIZE bytes padded to $PLAIN" >&2
fi
CHUNKS=$(( (PLAIN + 65535) / 65536 )); [[ $CHUNKS -eq 0 ]] && CHUNKS=1
BLOB_LEN=$((PLAIN + CHUNKS * 16))
echo "sealpost blob_bytes $BLOB_LEN bytes"

t0=$(now)
/usr/bin/time -f "%M %U %S %R" -o "$T/alice.rss" "$SP" "${A[@]}" --json send bob --file "$T/file.bin" "${PAD_ARG[@]}" --wait --timeout "${MAX_SECONDS}s" >"$T/send.json" &
SEND=$!
# Stage times, watched by one small process (a shell loop forking `stat`
# every 10 ms took 40 % of a core, which this two-core machine needs).
read -r t_queued t_uploaded t_stored < <(python3 - "$SEND" "$T" "$BLOB_LEN" "$BLOB_RELAY" <<'PY'
import os, sys, time
pid, root, blob_len = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
blobs, done = os.path.join(root, sys.argv[4], "store/blobs"), os.path.join(root, "incoming/file.bin")
tq = tu = ts = ""
def running():
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
while running():
    now = time.time()
    if not tu:
        names = os.listdir(blobs) if os.path.isdir(blobs) else []
        if names and not tq:
            tq = f"{now:.6f}"
        try:
            if names and os.stat(os.path.join(blobs, names[0])).st_size >= blob_len:
                tu = f"{now:.6f}"
        except OSError:
            pass
    if not ts and os.path.exists(done):
        ts = f"{now:.6f}"
    time.sleep(0.005)
print(tq or "-", tu or "-", ts or "-")
PY
)
[[ $t_queued == - ]] && t_queued=
[[ $t_uploaded == - ]] && t_uploaded=
[[ $t_stored == - ]] && t_stored=
wait "$SEND"
t1=$(now)
cmp -s "$T/file.bin" "$T/incoming/file.bin" || { echo "the received file differs" >&2; exit 1; }
state=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["deliveries"][0]["state"])' "$T/send.json")
[[ $state == delivered ]] || { echo "not delivered: $state" >&2; exit 1; }
: "${t_queued:=$t0}" "${t_uploaded:=$t_queued}" "${t_stored:=$t1}"
awk -v mb="$SIZE_MB" -v t0="$t0" -v tq="$t_queued" -v tu="$t_uploaded" -v ts="$t_stored" -v t1="$t1" 'BEGIN {
    printf "sealpost file_%dMiB_send_to_verified_receipt_seconds %.2f s\n", mb, t1 - t0
    printf "sealpost file_%dMiB_end_to_end_rate %.1f MiB/s\n", mb, mb / (t1 - t0)
    printf "sealpost stage_queue_hash_seconds %.2f s\n", tq - t0
    printf "sealpost stage_upload_seconds %.2f s\n", tu - tq
    printf "sealpost stage_download_write_readback_seconds %.2f s\n", ts - tu
    printf "sealpost stage_receipt_seconds %.2f s\n", t1 - ts
}' | tee "$T/sp.out"
cpu_s() { awk -v hz="$(getconf CLK_TCK)" '{ printf "%.2f", ($14 + $15) / hz }' "/proc/$1/stat"; }
# The same CPU time split: user space (our code, counted in instructions
# by bench/instructions.sh) and the kernel (copies to and from sockets and
# files, which callgrind does not see).
cpu_split() { awk -v hz="$(getconf CLK_TCK)" '{ printf "%.2f %.2f", $14 / hz, $15 / hz }' "/proc/$1/stat"; }
read -r rss u sy flt <"$T/alice.rss"
echo "sealpost peak_rss_sender $((rss / 1024)) MiB"
echo "sealpost peak_rss_relay $(( $(awk '/VmHWM/ { print $2 }' "/proc/$RELAY_A/status") / 1024 )) MiB"
if [[ $TWO_RELAYS == 1 ]]; then
    echo "sealpost peak_rss_relay_b $(( $(awk '/VmHWM/ { print $2 }' "/proc/$RELAY_B/status") / 1024 )) MiB"
fi
echo "sealpost peak_rss_recipient_agent $(( $(awk '/VmHWM/ { print $2 }' "/proc/$BOB/status") / 1024 )) MiB"
echo "sealpost cpu_sender $(awk -v u="$u" -v s="$sy" 'BEGIN { printf "%.2f", u + s }') s"
echo "sealpost cpu_relay $(cpu_s "$RELAY_A") s"
if [[ $TWO_RELAYS == 1 ]]; then
    echo "sealpost cpu_relay_b $(cpu_s "$RELAY_B") s"
fi
echo "sealpost cpu_recipient_agent $(cpu_s "$BOB") s"
echo "sealpost cpu_user_sys_sender $(awk -v u="$u" -v s="$sy" 'BEGIN { printf "%.2f %.2f", u, s }') s"
echo "sealpost cpu_user_sys_relay $(cpu_split "$RELAY_A") s"
echo "sealpost cpu_user_sys_recipient_agent $(cpu_split "$BOB") s"
# Minor page faults: fresh memory being faulted in (buffer churn).
echo "sealpost page_faults_sender $flt"
echo "sealpost page_faults_relay $(awk '{ print $10 }' "/proc/$RELAY_A/stat")"
echo "sealpost page_faults_recipient_agent $(awk '{ print $10 }' "/proc/$BOB/stat")"
# Bytes each long-running process read from the device: the recipient
# reads the file back once (more would mean a read-back started over).
echo "sealpost device_reads_relay $(( $(awk '/^read_bytes/ { print $2 }' "/proc/$RELAY_A/io") >> 20 )) MiB"
echo "sealpost device_reads_recipient_agent $(( $(awk '/^read_bytes/ { print $2 }' "/proc/$BOB/io") >> 20 )) MiB"
# Where the relay served the recipient's reads from: pieces still in memory
# since they were stored, or the blob file (the device: pieces are written
# with O_DIRECT).
relay_blob_metrics "$((PORT + 1))"
if [[ $CLUSTER == 1 ]]; then
    cpu_pg=0
    pgpid=$(head -1 "$PG_DATA/postmaster.pid")
    for p in $pgpid $(pgrep -P "$pgpid"); do
        cpu_pg=$(LC_ALL=C awk -v a="$cpu_pg" -v hz="$(getconf CLK_TCK)" '{ printf "%.2f", a + ($14 + $15) / hz }' "/proc/$p/stat" 2>/dev/null || echo "$cpu_pg")
    done
    echo "sealpost cpu_postgres $cpu_pg s"
    echo "sealpost cpu_garage $(cpu_s "$GARAGE_PID") s"
    echo "# Garage's own PUT/GET of ${SIZE_MB} MiB (8 MiB objects, curl)" >&2
    s3_rates "$SIZE_MB" | tee "$T/s3.out"
    LC_ALL=C awk -v s="$(awk '$2 ~ /end_to_end_rate/ { print $3 }' "$T/sp.out")" \
        -v b="$(awk '$2 == "s3_bound_put_then_get" { print $3 }' "$T/s3.out")" \
        'BEGIN { if (b > 0) printf "ratio sealpost/s3_bound %.0f %%\n", 100 * s / b }'
fi

if [[ $ANCHORS == 1 ]]; then
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null && wait "$p" 2>/dev/null; done
    PIDS=()
    rm -rf "$T/file.bin" "$T/incoming"
    echo "# running nncp.sh SIZE_MB=$SIZE_MB N=10" >&2
    SIZE_MB=$SIZE_MB N=10 TMPDIR=/var/tmp bash ../shared/bench/anchors/nncp.sh 2>"$T/nncp.log" | tee "$T/nncp.out"
    echo "# running limits.sh" >&2
    bash ../shared/bench/anchors/limits.sh 2>/dev/null | tee "$T/limits.out" | grep -E 'seq-write-1GiB-conv=fsync |seq-read-cold ' || true
    w=$(awk '$2 ~ /^disk-tmp-seq-write-1GiB-conv=fsync$/ { print $3 }' "$T/limits.out")
    r=$(awk '$2 ~ /^disk-tmp-seq-read-cold$/ { print $3 }' "$T/limits.out")
    rate=$(awk '$2 ~ /end_to_end_rate/ { print $3 }' "$T/sp.out")
    LC_ALL=C awk -v w="$w" -v r="$r" -v s="$rate" 'BEGIN {
        if (w > 0 && r > 0) {
            b = 1 / (2 / w + 1 / r)
            printf "limit disk_bound_write_twice_read_once %.0f MiB/s\n", b
            printf "ratio sealpost/disk_bound %.0f %%\n", 100 * s / b
        }
    }'
    n=$(awk '$1 == "nncp" && $2 ~ /e2e|end_to_end|total/ && $4 ~ /MiB\/s|MB\/s/ { print $2, $3, $4 }' "$T/nncp.out" | head -3)
    echo "# nncp figures used: $n" >&2
    nrate=$(awk '$1 == "nncp" && $2 == "bulk_total_rate" { print $3 }' "$T/nncp.out")
    LC_ALL=C awk -v n="$nrate" -v s="$rate" 'BEGIN {
        if (n > 0) printf "ratio sealpost/nncp_bulk_total_rate %.2f x\n", s / n
    }'
fi
