#!/usr/bin/env bash
# A hostile contact against an agent (issue 21; docs/RELIABILITY.md holds
# the latest figures): bob pins mallory, whose `sealpost-hostile-contact`
# sends malformed manifests, names that climb out, a terabyte announced, a
# file whose blob never comes, the longest names twice, the agent's own
# partial-file name, the deepest tree, the same file SAME_FILE times,
# REPLAYS replays and a FLOOD of messages — while alice sends HONEST
# messages to bob and bob's `sealpost agent` runs. Prints mallory's report,
# how long alice's messages took to be receipted, bob's agent's peak RSS
# and CPU, and what landed in bob's download directory; exits non-zero if
# an honest message was not receipted within LIMIT seconds or anything
# landed outside the download directory.
#
#   bench/hostile-contact.sh
#   FLOOD=5000 REPLAYS=500 bench/hostile-contact.sh
#
# Bounded: the counts above and LIMIT; everything on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
SEED=${SEED:-21}
FLOOD=${FLOOD:-1000}
REPLAYS=${REPLAYS:-100}
SAME_FILE=${SAME_FILE:-20}
HONEST=${HONEST:-50}
LIMIT=${LIMIT:-120}
PORT=${PORT:-47643}
T=$(mktemp -d /tmp/sealpost-hostile-contact.XXXXXX)
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true; rm -rf "$T"' EXIT

cargo build --release --locked -p sealpost -p sealpost-testkit >&2
SP=target/release/sealpost
# shellcheck source=bench/lib.sh
. bench/lib.sh
start_relay
sp() { SEALPOST_LOG=error "$SP" --home "$T/$1" "${@:2}"; }
sp alice init --name alice --relay "$ADDR" >/dev/null
sp bob init --name bob --relay "$ADDR" >/dev/null
sp alice id >"$T/alice.card" 2>/dev/null
sp bob id >"$T/bob.card" 2>/dev/null
sp alice contact add "$T/bob.card" --name bob >/dev/null
sp bob contact add "$T/alice.card" --name alice >/dev/null
target/release/sealpost-hostile-contact --relay "$ADDR" --seed "$SEED" --card-out "$T/mallory.card"
sp bob contact add "$T/mallory.card" --name mallory >/dev/null
mkdir -p "$T/bob-dl"
SEALPOST_LOG=warn "$SP" --home "$T/bob" agent --downloads "$T/bob-dl" 2>"$T/bob-agent.log" &
AGENT=$!
PIDS+=("$AGENT")
sleep 0.5
start=$(date +%s.%N)
for i in $(seq "$HONEST"); do sp alice send bob "honest $i" >/dev/null || true; done &
HONEST_PID=$!
target/release/sealpost-hostile-contact --relay "$ADDR" --victim-card "$T/bob.card" --seed "$SEED" \
    --flood "$FLOOD" --replays "$REPLAYS" --same-file "$SAME_FILE" >"$T/report.json"
wait "$HONEST_PID"
cat "$T/report.json"
delivered=0
while :; do
    sp alice sync >/dev/null 2>&1 || true
    delivered=$(sp alice status --json --limit 100000 | python3 -c 'import json,sys; v=json.load(sys.stdin); print(sum(1 for m in v["messages"] for d in m["deliveries"] if d["state"]=="delivered"))')
    [ "$delivered" -ge "$HONEST" ] && break
    if [ "$(echo "$(date +%s.%N) - $start > $LIMIT" | bc)" = 1 ]; then break; fi
    sleep 0.5
done
took=$(echo "$(date +%s.%N) - $start" | bc)
peak=$(awk '/VmHWM/ {print $2}' "/proc/$AGENT/status")
cpu=$(awk '{print ($14 + $15) / 100}' "/proc/$AGENT/stat")
echo "honest messages receipted: $delivered of $HONEST in ${took} s"
echo "bob's agent: peak RSS $((peak / 1024)) MiB, CPU ${cpu} s"
echo "bob's download directory: $(find "$T/bob-dl" -type f | wc -l) files, $(du -sk "$T/bob-dl" | cut -f1) KiB"
echo "bob's home: $(du -sk "$T/bob" | cut -f1) KiB; inbox $(sp bob inbox --json --limit 100000 | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["messages"]))') messages"
echo "bob's agent log: $(grep -c WARN "$T/bob-agent.log" || true) warnings ($(grep -c 'rejected' "$T/bob-agent.log" || true) rejections)"
outside=$(find "$T" -maxdepth 1 -newer "$T/mallory.card" ! -name 'bob*' ! -name 'alice*' ! -name 'relay*' ! -name 'report.json' ! -path "$T" | wc -l)
if [ "$outside" -ne 0 ] || [ -e "$T/escape.txt" ] || [ -e /etc/passwd-x ]; then
    echo "FAILED: something landed outside the download directory"
    exit 1
fi
if [ "$delivered" -lt "$HONEST" ]; then
    echo "FAILED: honest messages not receipted within $LIMIT s"
    exit 1
fi
