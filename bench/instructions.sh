#!/usr/bin/env bash
# CPU work per message counted in instructions (valgrind --tool=callgrind),
# which do not drift with this VM's speed (issue 20). On the release
# binary, everything on 127.0.0.1: Alice queues N 1 KiB messages for Bob
# (`send --repeat`), submits them (`sync`), Bob receives them all in one
# `sync` (fetch, open, store, read back, receipts), and Alice takes the
# receipts in one `sync`; each measured, and the relay too (under
# callgrind for the whole run, less its start and stop measured alone).
# Then all processes per message beside the floor: the same number of
# 1 KiB messages sealed and opened by `sealpost-floor`, memory to memory
# (the public-key operations, hashing and AEAD a message cannot avoid).
#
#   bench/instructions.sh                 # N=2000
#   SP=/other/sealpost bench/instructions.sh   # another binary (before/after)
#   FILE_MB=64 bench/instructions.sh      # a file instead, per process
#   HISTORY=1000000 bench/instructions.sh # N messages after a million
#
# Output: "<step> <instructions> Ir" and per message. Keeps the callgrind
# files when KEEP=1 (for callgrind_annotate). Bounded: N messages.
#
# FILE_MB=M: Alice sends Bob one file of M MiB through the relay, the relay
# running under callgrind too; prints each process's instructions per MiB
# (the sender's `send --file` and `sync`, the relay's whole run less its
# start and stop measured alone, Bob's `sync`: download, open, store, read
# back, receipt) beside the cryptographic floor of that process, counted
# the same way by `sealpost-floor` (the same library calls on the same
# amount of data, memory to memory): the sender seals the file and
# protects it for TLS, the relay removes TLS, hashes the blob and protects
# it again, the recipient removes TLS, opens the blob and hashes the file
# it read back.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-2000}
PORT=${PORT:-17999}
if [[ -z ${SP:-} ]]; then
    cargo build --release --locked -q -p sealpost
    SP=$PWD/target/release/sealpost
fi
command -v valgrind >/dev/null || { echo "valgrind is not installed" >&2; exit 2; }
T=$(mktemp -d /tmp/sealpost-instructions.XXXXXX)
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    [[ ${KEEP:-0} == 1 ]] && echo "# kept $T" >&2 || rm -rf "$T"
}
trap cleanup EXIT
export SEALPOST_LOG=warn
. bench/lib.sh
FLOOR=$PWD/target/release/sealpost-floor
[[ -x $FLOOR ]] || cargo build --release --locked -q -p sealpost-testkit --bin sealpost-floor
ir_of() { sed -n 's/.*Collected : \([0-9]*\).*/\1/p' "$1"; }
cg() { # name command...
    local name=$1
    shift
    valgrind --tool=callgrind --callgrind-out-file="$T/$name.cg" "$@" >"$T/$name.out" 2>"$T/$name.vg"
    ir_of "$T/$name.vg"
}
# The relay under callgrind (its start and stop are measured alone once,
# relay_idle, and taken off the run's count).
relay_cg() { # name
    local WRAP=(valgrind --tool=callgrind --callgrind-out-file="$T/$1.cg" --log-file="$T/$1.vg")
    relay_at "$T/relay" 127.0.0.1 "$PORT"
    ADDR=$AT
}
relay_stop() {
    kill -TERM "$RELAY"
    wait "$RELAY" 2>/dev/null || true
}
setup() { # Alice and Bob, each the other's contact, on the relay at $ADDR
    A=(--home "$T/alice")
    B=(--home "$T/bob")
    card() { "$SP" "$@" --json id | python3 -c 'import json,sys; print(json.load(sys.stdin)["card"])'; }
    "$SP" "${A[@]}" init --name alice --relay "$ADDR" >/dev/null
    "$SP" "${B[@]}" init --name bob --relay "$ADDR" >/dev/null
    "$SP" "${A[@]}" contact add "$(card "${B[@]}")" --name bob >/dev/null
    "$SP" "${B[@]}" contact add "$(card "${A[@]}")" --name alice >/dev/null
    "$SP" "${B[@]}" sync >/dev/null
}
# AWS-LC seeds its own random generator with CPU-jitter entropy (about
# 420 M instructions, tens of milliseconds) the first time a process draws
# from it; sealpost takes its randomness from the kernel and never should.
no_jitter() { # names of kept profiles
    local n
    for n in "$@"; do
        if grep -q 'jent_' "$T/$n.cg"; then
            echo "$n seeded AWS-LC's random generator (CPU-jitter entropy): sealpost draws from the kernel only" >&2
            exit 1
        fi
    done
}
"$SP" relay init --data "$T/relay" >/dev/null 2>&1 || true
relay_cg relay_idle
relay_stop
r_idle=$(ir_of "$T/relay_idle.vg")
if [[ -n ${FILE_MB:-} ]]; then
    # The floor, step by step (seal-open less seal is the opening).
    f_seal=$(cg floor_seal "$FLOOR" seal --mb "$FILE_MB")
    f_both=$(cg floor_seal_open "$FLOOR" seal-open --mb "$FILE_MB")
    f_hash=$(cg floor_hash "$FLOOR" hash --mb "$FILE_MB")
    f_tls=$(cg floor_tls "$FLOOR" tls --mb "$FILE_MB")
    f_open=$((f_both - f_seal))
    relay_cg relay_file
    setup
    head -c "$((FILE_MB * 1024 * 1024))" /dev/urandom >"$T/file"
    s_send=$(cg alice_send "$SP" "${A[@]}" send bob --file "$T/file")
    s_sync=$(cg alice_sync "$SP" "${A[@]}" sync)
    r_sync=$(cg bob_sync "$SP" "${B[@]}" --json sync)
    cmp -s "$T/file" "$(find "$T/bob" -type f -name file -size "$((FILE_MB * 1024))k" | head -1)" ||
        { echo "bob's copy of the file is not the file" >&2; exit 1; }
    "$SP" "${A[@]}" sync >/dev/null
    relay_stop
    r_file=$(ir_of "$T/relay_file.vg")
    no_jitter alice_send alice_sync bob_sync relay_file
    python3 - "$FILE_MB" "$f_seal" "$f_open" "$f_hash" "$f_tls" "$s_send" "$s_sync" \
        "$((r_file - r_idle))" "$r_idle" "$r_sync" <<'PY'
import sys
mb, f_seal, f_open, f_hash, f_tls, s_send, s_sync, relay, r_idle, bob = (int(x) for x in sys.argv[1:])
m = lambda x: x / mb / 1e6
print(f"floor seal {m(f_seal):.2f} M Ir/MiB, open {m(f_open):.2f}, BLAKE3 {m(f_hash):.2f}, TLS record protection {m(f_tls):.2f} (one direction)")
rows = [
    ("sender (send --file + sync)", s_send + s_sync, f_seal + f_tls),
    ("relay (less its start and stop, %.0f M Ir)" % (r_idle / 1e6), relay, 2 * f_tls + f_hash),
    ("recipient (sync)", bob, f_tls + f_open + f_hash),
]
total, floor = 0, 0
for name, ir, fl in rows:
    total += ir
    floor += fl
    print(f"sealpost instructions_per_MiB {name}: {m(ir):.2f} M Ir, floor {m(fl):.2f} M Ir, {ir / fl:.2f}x the floor")
print(f"sealpost instructions_per_MiB all three: {m(total):.2f} M Ir, floor {m(floor):.2f} M Ir, {total / floor:.2f}x the floor")
PY
    exit 0
fi
head -c 1024 /dev/urandom | base64 -w0 | head -c 1024 >"$T/content"
if [[ ${HISTORY:-0} -gt 0 ]]; then
    # HISTORY messages sent, delivered and receipted before anything is
    # counted (through running agents, the relay not under callgrind), so
    # that the counts below say what a message costs with that history
    # behind it (issue 22: flat cost).
    relay_at "$T/relay" 127.0.0.1 "$PORT"
    ADDR=$AT
    setup
    start_agent "${B[@]}"
    start_agent "${A[@]}"
    "$SP" "${A[@]}" send bob - --repeat "$HISTORY" <"$T/content" >/dev/null
    wait_delivered "$HISTORY" 3600 "the history" "${A[@]}"
    kill -TERM "${PIDS[-1]}" "${PIDS[-2]}"
    wait "${PIDS[-1]}" "${PIDS[-2]}" 2>/dev/null || true
    relay_stop
    echo "# history: $HISTORY messages delivered and receipted" >&2
    relay_cg relay_msgs
else
    relay_cg relay_msgs
    setup
fi
count() { # name command...: prints the instructions, keeps them in IR_<name>
    local name=$1 ir
    shift
    ir=$(cg "$name" "$@")
    printf -v "IR_$name" '%s' "$ir"
    echo "sealpost instructions_$name $ir Ir"
    echo "sealpost instructions_${name}_per_msg $((ir / N)) Ir"
}
count alice_send_repeat "$SP" "${A[@]}" send bob - --repeat "$N" <"$T/content"
count alice_sync_submit "$SP" "${A[@]}" sync
count bob_sync "$SP" "${B[@]}" --json sync
delivered=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["delivered"])' "$T/bob_sync.out")
[[ $delivered -eq $N ]] || { echo "bob received $delivered of $N" >&2; exit 1; }
count alice_sync_receipts "$SP" "${A[@]}" --json sync
confirmed=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["confirmed"])' "$T/alice_sync_receipts.out")
[[ $confirmed -eq $N ]] || { echo "alice confirmed $confirmed of $N" >&2; exit 1; }
relay_stop
relay=$(($(ir_of "$T/relay_msgs.vg") - r_idle))
no_jitter alice_send_repeat alice_sync_submit bob_sync alice_sync_receipts relay_msgs
echo "sealpost instructions_relay $relay Ir (less its start and stop, $r_idle Ir)"
echo "sealpost instructions_relay_per_msg $((relay / N)) Ir"
# The floor: the same number of 1 KiB messages sealed and opened, memory to
# memory (less the floor tool's own start, one message's worth).
f_one=$(cg floor_one "$FLOOR" message --count 1)
f_all=$(cg floor_msgs "$FLOOR" message --count "$((N + 1))")
floor=$((f_all - f_one))
total=$((IR_alice_send_repeat + IR_alice_sync_submit + IR_bob_sync + IR_alice_sync_receipts + relay))
python3 - "$N" "$total" "$floor" <<'PY'
import sys
n, total, floor = (int(x) for x in sys.argv[1:])
print(f"sealpost instructions_per_msg_all_processes {total / n / 1e6:.2f} M Ir, floor (seal + open of a 1 KiB message) {floor / n / 1e6:.2f} M Ir, {total / floor:.2f}x the floor")
PY
