#!/usr/bin/env bash
# Delivery with verified receipts, end to end, on the release binaries:
# a relay and two agents (alice, bob) on 127.0.0.1.
#
#   bench/delivery.sh                   # then run the Postfix anchor yourself
#   ANCHOR=1 bench/delivery.sh          # also runs ../shared/bench/anchors/postfix.sh
#                                       # (MODES=maildir, N=2000) in the same session,
#                                       # then limits.sh (this sitting's bounds)
#   TWO_RELAYS=1 bench/delivery.sh      # alice's relay on 127.0.0.2, bob's on 127.0.0.3;
#                                       # alice submits to bob's relay herself (direct)
#   TWO_RELAYS=1 FORWARD=on bench/delivery.sh  # both agents hand everything to their
#                                       # own relay, which forwards (PROTOCOL 6.8)
#
# 1. Throughput: alice queues COUNT messages of SIZE bytes to bob (`send
#    --repeat`, which seals and commits each one and wakes her agent every
#    1,000). Her agent submits them; bob's agent fetches, verifies, stores
#    (fsync + fadvise(DONTNEED) + read-back hash) and sends batched signed
#    receipts; alice's agent verifies them. Timed from the first `send` to
#    the moment `status` counts COUNT delivered.
#    HISTORY=N first sends N messages the same way and waits until they
#    are delivered and receipted; then the COUNT messages are measured
#    (their throughput and the CPU each process spent on them alone) with
#    that history behind them (issue 22: cost that does not grow).
#    FROM=DIR starts instead from a copy of the relay and homes a KEEP=1
#    run left in DIR (same PORT): the same history for every build of an
#    A/B pair, without sending it again (a million takes minutes).
# 2. Latency: LONE messages, one at a time, `send --wait` with both agents
#    running; `waited_ms` is measured inside `send` from the committed queue
#    entry to the verified receipt in alice's database. The wall time of the
#    whole command (process start, key loading, sealing) is printed too.
#
# Output lines: "<system> <figure> <value> <unit>", then "ratio" lines.
# Bounded: COUNT messages, LONE round trips, MAX_SECONDS; loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
COUNT=${COUNT:-10000}
SIZE=${SIZE:-1024}
LONE=${LONE:-200}
MAX_SECONDS=${MAX_SECONDS:-300}
PORT=${PORT:-17543}
ANCHOR=${ANCHOR:-0}
TWO_RELAYS=${TWO_RELAYS:-0}
FORWARD=${FORWARD:-off}
# PAD=0 sends unpadded messages (`send --no-pad`), for the padding's cost.
PAD=${PAD:-1}
NOPAD=()
[[ $PAD == 1 ]] || NOPAD=(--no-pad)
ANCHOR_SCRIPT=${ANCHOR_SCRIPT:-../shared/bench/anchors/postfix.sh}

# SP=/path/to/sealpost measures that binary instead (before/after pairs).
if [[ -z ${SP:-} ]]; then
    cargo build --release --locked -q -p sealpost
    SP=$PWD/target/release/sealpost
fi
T=$(mktemp -d /var/tmp/sealpost-delivery-bench.XXXXXX)
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null && wait "$p" 2>/dev/null; done
    [[ ${KEEP:-0} == 1 ]] || rm -rf "$T"
}
trap cleanup EXIT
export SEALPOST_LOG=warn

NAMES=(relay)
if [[ -n ${FROM:-} ]]; then
    [[ $TWO_RELAYS == 0 ]] || { echo "FROM: one relay only" >&2; exit 1; }
    cp -a "$FROM/relay" "$FROM/alice" "$FROM/bob" "$T/"
    rm -f "$T/alice/agent.sock" "$T/bob/agent.sock"
    sync
fi
if [[ $TWO_RELAYS == 1 ]]; then
    # Each relay on its own loopback address, as two machines would be.
    relay_at "$T/relay" 127.0.0.2 "$PORT"
    ADDR=$AT
    relay_at "$T/relay-b" 127.0.0.3 "$((PORT + 2))"
    ADDR_B=$AT
    NAMES+=(relay-b)
    echo "# alice's relay at $ADDR, bob's at $ADDR_B, forwarding $FORWARD" >&2
else
    start_relay
    ADDR_B=$ADDR
fi
echo "# relay at $ADDR, loadavg $(cut -d' ' -f1-3 /proc/loadavg)" >&2

A=(--home "$T/alice")
B=(--home "$T/bob")
if [[ -n ${FROM:-} ]]; then
    [[ -z ${HISTORY:-} ]] || { echo "FROM and HISTORY: one or the other" >&2; exit 1; }
else
"$SP" "${A[@]}" init --name alice --relay "$ADDR" >/dev/null
"$SP" "${B[@]}" init --name bob --relay "$ADDR_B" >/dev/null
"$SP" "${A[@]}" contact add "$("$SP" "${B[@]}" --json id | python3 -c 'import json,sys; print(json.load(sys.stdin)["card"])')" --name bob >/dev/null
"$SP" "${B[@]}" contact add "$("$SP" "${A[@]}" --json id | python3 -c 'import json,sys; print(json.load(sys.stdin)["card"])')" --name alice >/dev/null
fi

start_agent "${B[@]}" --forward "$FORWARD"
start_agent "${A[@]}" --forward "$FORWARD"
NAMES+=(bob-agent alice-agent)

delivered() { delivered_at "${A[@]}"; }
rss_kib() { awk '/VmHWM/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }
cpu_ms() { awk -v hz="$(getconf CLK_TCK)" '{ print int(($14 + $15) * 1000 / hz) }' "/proc/$1/stat" 2>/dev/null || echo 0; }
# Read and write system calls and bytes (/proc/PID/io), for the per-message
# figures below: "syscr syscw read_bytes write_bytes" (bytes from and to
# the device; the page cache's are rchar/wchar).
io_now() { awk '/^syscr|^syscw|^read_bytes|^write_bytes/ { v[$1] = $2 } END { printf "%.0f %.0f %.0f %.0f\n", v["syscr:"], v["syscw:"], v["read_bytes:"], v["write_bytes:"] }' "/proc/$1/io" 2>/dev/null || echo 0 0 0 0; }
sys_ms() { awk -v hz="$(getconf CLK_TCK)" '{ print int($15 * 1000 / hz) }' "/proc/$1/stat" 2>/dev/null || echo 0; }

# ---- throughput ----
head -c "$SIZE" /dev/urandom | base64 -w0 | head -c "$SIZE" >"$T/content"
CPU0=()
if [[ ${HISTORY:-0} -gt 0 ]]; then
    "$SP" "${A[@]}" send bob - --repeat "$HISTORY" "${NOPAD[@]}" <"$T/content" >/dev/null
    wait_delivered "$HISTORY" "$MAX_SECONDS" "the history" "${A[@]}"
    sleep 2
    echo "# history: $HISTORY messages delivered and receipted, loadavg $(cut -d' ' -f1-3 /proc/loadavg)" >&2
fi
if [[ -n ${FROM:-} ]]; then
    # The agents' first passes over a copied home, before the count.
    sleep 2
    echo "# from $FROM: $(delivered) messages of history, loadavg $(cut -d' ' -f1-3 /proc/loadavg)" >&2
fi
IO0=()
for p in "${PIDS[@]}"; do CPU0+=("$(cpu_ms "$p") $(sys_ms "$p")"); IO0+=("$(io_now "$p")"); done
base=$(delivered)
t0=$(date +%s.%N)
# The queueing command's own CPU (it seals every message) is measured too:
# per message, the four processes' CPU is the whole of it.
/usr/bin/time -f "%U %S" -o "$T/send.cpu" "$SP" "${A[@]}" send bob - --repeat "$COUNT" "${NOPAD[@]}" <"$T/content" >/dev/null
t_queued=$(date +%s.%N)
deadline=$(( $(date +%s) + MAX_SECONDS ))
while :; do
    d=$(( $(delivered) - base ))
    [[ $d -ge $COUNT ]] && break
    if [[ $(date +%s) -ge $deadline ]]; then
        echo "sealpost delivery: only $d of $COUNT delivered within ${MAX_SECONDS}s" >&2
        exit 1
    fi
    sleep 0.05
done
t1=$(date +%s.%N)
awk -v n="$COUNT" -v t0="$t0" -v t1="$t1" 'BEGIN { printf "%.0f\n", n / (t1 - t0) }' >"$T/sp.rate"
awk -v n="$COUNT" -v t0="$t0" -v tq="$t_queued" -v t1="$t1" 'BEGIN {
    printf "sealpost delivered_with_receipts_%s_msgs_per_sec %.0f msg/s\n", n, n / (t1 - t0)
    printf "sealpost delivered_with_receipts_%s_seconds %.2f s\n", n, t1 - t0
    printf "sealpost queue_%s_seconds %.2f s\n", n, tq - t0
    printf "sealpost drain_after_queue_seconds %.2f s\n", t1 - tq
}'
i=0
for p in "${PIDS[@]}"; do
    read -r c0 s0 <<<"${CPU0[$i]}"
    echo "sealpost peak_rss_${NAMES[$i]} $(( $(rss_kib "$p") / 1024 )) MiB"
    echo "sealpost cpu_us_per_msg_${NAMES[$i]} $(( ($(cpu_ms "$p") - c0) * 1000 / COUNT )) us (of which in the kernel $(( ($(sys_ms "$p") - s0) * 1000 / COUNT )))"
    read -r r0 w0 rb0 wb0 <<<"${IO0[$i]}"
    read -r r1 w1 rb1 wb1 <<<"$(io_now "$p")"
    LC_ALL=C awk -v n="$COUNT" -v name="${NAMES[$i]}" -v r="$((r1 - r0))" -v w="$((w1 - w0))" -v rb="$((rb1 - rb0))" -v wb="$((wb1 - wb0))" \
        'BEGIN { printf "sealpost io_per_msg_%s %.1f reads %.1f writes (device: %.0f B read, %.0f B written)\n", name, r / n, w / n, rb / n, wb / n }'
    i=$((i + 1))
done
read -r su ss <"$T/send.cpu"
LC_ALL=C awk -v n="$COUNT" -v u="$su" -v s="$ss" \
    'BEGIN { printf "sealpost cpu_us_per_msg_alice-send %.0f us (of which in the kernel %.0f)\n", (u + s) * 1e6 / n, s * 1e6 / n }'
ALL=$(( base + COUNT ))
inbox=$("$SP" "${B[@]}" --json inbox --limit "$ALL" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["messages"]))')
echo "sealpost bob_inbox_count $inbox messages"
[[ $inbox -eq $ALL ]] || { echo "bob's inbox holds $inbox, expected $ALL" >&2; exit 1; }

# ---- lone-message latency ----
: >"$T/lat"
: >"$T/wall"
for _ in $(seq "$LONE"); do
    s=$(date +%s%N)
    "$SP" "${A[@]}" --json send bob "lone message" --wait --timeout 30s >>"$T/lone.json"
    e=$(date +%s%N)
    echo "$(( (e - s) / 1000 ))" >>"$T/wall"
done
python3 -c 'import json,sys; [print(json.loads(l)["waited_ms"]) for l in open(sys.argv[1])]' "$T/lone.json" >"$T/lat"
pct() { sort -g "$1" | awk -v p="$2" '{ a[NR] = $1 } END { i = int(NR * p / 100 + 0.999); if (i < 1) i = 1; print a[i] }'; }
pct "$T/lat" 50 >"$T/lone.p50"
echo "sealpost lone_send_to_receipt_p50 $(cat "$T/lone.p50") ms"
echo "sealpost lone_send_to_receipt_p99 $(pct "$T/lat" 99) ms"
echo "sealpost lone_command_wall_p50 $(awk '{ print $1 / 1000 }' "$T/wall" | sort -g | awk '{ a[NR] = $1 } END { print a[int(NR / 2 + 0.5)] }') ms"
echo "sealpost lone_command_wall_p99 $(awk '{ print $1 / 1000 }' "$T/wall" >"$T/wallms"; pct "$T/wallms" 99) ms"

# ---- space after delivery (issue 22) ----
# Everything is delivered and receipted; after two idle seconds the relay's
# writer has given free pages back, and each agent after its passes.
sleep 2
sz() { local t=0 f; for f in "$@"; do [[ -e $f ]] && t=$(( t + $(stat -c %s "$f") )); done; echo $(( t / 1024 )); }
# After a backlog, alice's agent gives its free pages back in short steps
# while idle: wait (at most GIVE_BACK_SECONDS) until her database has not
# shrunk for 3 s, and say how long that took.
g0=$(date +%s.%N)
last=$(sz "$T/alice/agent.db" "$T/alice/agent.db-wal"); still=0
for _ in $(seq "${GIVE_BACK_SECONDS:-300}"); do
    sleep 1
    now=$(sz "$T/alice/agent.db" "$T/alice/agent.db-wal")
    if [[ $now -lt $last ]]; then still=0; last=$now; else still=$((still + 1)); fi
    [[ $still -ge 3 ]] && break
done
if [[ $still -ge 3 ]]; then
    awk -v g0="$g0" -v g1="$(date +%s.%N)" 'BEGIN { printf "sealpost space_alice_settled_after %.0f s\n", g1 - g0 - 3 }'
else
    echo "sealpost space_alice_settled_after not within ${GIVE_BACK_SECONDS:-300} s"
fi
echo "sealpost space_relay_db $(sz "$T/relay/store/relay.db" "$T/relay/store/relay.db-wal") KiB"
echo "sealpost space_alice_db $(sz "$T/alice/agent.db" "$T/alice/agent.db-wal") KiB"
echo "sealpost space_bob_db $(sz "$T/bob/agent.db" "$T/bob/agent.db-wal") KiB"
echo "sealpost space_bob_inbox $(du -sk "$T/bob/inbox" | cut -f1) KiB"
echo "sealpost space_alice_home_bytes_per_delivered $(( $(du -sb "$T/alice" | cut -f1) / (ALL + LONE) )) B"

if [[ $ANCHOR == 1 ]]; then
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null && wait "$p" 2>/dev/null; done
    PIDS=()
    echo "# running $ANCHOR_SCRIPT (MODES=maildir SIZES=1024 N=${ANCHOR_N:-2000})" >&2
    MODES=maildir SIZES=1024 N=${ANCHOR_N:-2000} bash "$ANCHOR_SCRIPT" | tee "$T/pf.out"
    pf=$(awk '$1 == "postfix" && $2 == "maildir_1KiB_e2e_rate" { print $3 }' "$T/pf.out")
    sp=$(cat "$T/sp.rate")
    LC_ALL=C awk -v a="$sp" -v b="$pf" 'BEGIN { if (b > 0) printf "ratio delivered_with_receipts/postfix_maildir_e2e %.1f x\n", a / b; else print "ratio n/a" }'
    # The sitting's bounds: the public-key operations a message needs, the
    # disk's fdatasync and a loopback round trip. A lone message waits for
    # five fdatasyncs in series (relay accept, recipient's spool and
    # database, relay accept of the receipt, sender's commit) and four
    # relay round trips (PROTOCOL 8): their p50s added are the least its
    # p50 could be with this design, on this sitting's disk and network.
    sitting_limits 'openssl-ed25519-(sign|verify)|openssl-x25519-derive|fsync-tmp-append-fdatasync-1KiB(-p50)?|tcp-pingpong-c-64B-p50'
    LC_ALL=C awk -v f="$(limit_of fsync-tmp-append-fdatasync-1KiB-p50)" -v r="$(limit_of tcp-pingpong-c-64B-p50)" -v l="$(cat "$T/lone.p50")" \
        'BEGIN { if (f > 0 && r > 0) { b = (5 * f + 4 * r) / 1000; printf "limit lone_floor_5_fdatasync_4_roundtrips %.2f ms\nratio lone_p50/lone_floor %.1f x\n", b, l / b } }'
fi
