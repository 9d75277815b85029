#!/usr/bin/env bash
# CPU work per message counted in instructions (valgrind --tool=callgrind),
# which do not drift with this VM's speed (issue 20). On the release
# binary, everything on 127.0.0.1: Alice queues N 1 KiB messages for Bob
# (`send --repeat`, measured), submits them (`sync`), Bob receives them
# all in one `sync` (measured: fetch, open, store, read back, receipts),
# and Alice takes the receipts in one `sync` (measured).
#
#   bench/instructions.sh                 # N=2000
#   SP=/other/sealpost bench/instructions.sh   # another binary (before/after)
#
# Output: "<step> <instructions> Ir" and per message. Keeps the callgrind
# files when KEEP=1 (for callgrind_annotate). Bounded: N messages.
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
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
    [[ ${KEEP:-0} == 1 ]] && echo "# kept $T" >&2 || rm -rf "$T"
}
trap cleanup EXIT
export SEALPOST_LOG=warn
. bench/lib.sh
start_relay
A=(--home "$T/alice")
B=(--home "$T/bob")
card() { "$SP" "$@" --json id | python3 -c 'import json,sys; print(json.load(sys.stdin)["card"])'; }
"$SP" "${A[@]}" init --name alice --relay "$ADDR" >/dev/null
"$SP" "${B[@]}" init --name bob --relay "$ADDR" >/dev/null
"$SP" "${A[@]}" contact add "$(card "${B[@]}")" --name bob >/dev/null
"$SP" "${B[@]}" contact add "$(card "${A[@]}")" --name alice >/dev/null
"$SP" "${B[@]}" sync >/dev/null
head -c 1024 /dev/urandom | base64 -w0 | head -c 1024 >"$T/content"
count() { # name callgrind-args...
    local name=$1
    shift
    valgrind --tool=callgrind --callgrind-out-file="$T/$name.cg" "$@" >"$T/$name.out" 2>"$T/$name.vg"
    local ir
    ir=$(sed -n 's/.*Collected : \([0-9]*\).*/\1/p' "$T/$name.vg")
    echo "sealpost instructions_$name $ir Ir"
    echo "sealpost instructions_${name}_per_msg $((ir / N)) Ir"
}
count alice_send_repeat "$SP" "${A[@]}" send bob - --repeat "$N" <"$T/content"
"$SP" "${A[@]}" sync >/dev/null
count bob_sync "$SP" "${B[@]}" --json sync
delivered=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["delivered"])' "$T/bob_sync.out")
[[ $delivered -eq $N ]] || { echo "bob received $delivered of $N" >&2; exit 1; }
count alice_sync_receipts "$SP" "${A[@]}" --json sync
confirmed=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["confirmed"])' "$T/alice_sync_receipts.out")
[[ $confirmed -eq $N ]] || { echo "alice confirmed $confirmed of $N" >&2; exit 1; }
