#!/usr/bin/env bash
# Many agents online at once (issue 23; docs/BENCHMARKS.md holds the
# latest figures). For each N in COUNTS: a fresh release relay on
# 127.0.0.1, N connections from SOURCES loopback addresses (127.0.0.2 on)
# that each register a mailbox, subscribe and stay idle, as a running
# `sealpost agent` does. Prints per N: the relay's RSS before and with the
# agents (and per connection), the CPU it spends on them while idle over
# IDLE_SECS, and the push latency (submission answered -> Notify at the
# subscriber) of PUSHES pushes to random agents while the others stay
# connected. Exits non-zero if an agent could not subscribe or a push was
# lost or reached the wrong connection.
#
#   bench/idle-agents.sh
#   COUNTS="1000 20000" bench/idle-agents.sh    # needs ulimit -n above N
#
# Bounded: N connections per run, HOLD before the pushes, everything on
# 127.0.0.x.
set -euo pipefail
cd "$(dirname "$0")/.."
COUNTS=${COUNTS:-"1000 5000 10000"}
SOURCES=${SOURCES:-64}
PUSHES=${PUSHES:-200}
IDLE_SECS=${IDLE_SECS:-5}
PORT=${PORT:-47643}
T=$(mktemp -d /tmp/sealpost-idle-agents.XXXXXX)
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true; rm -rf "$T"' EXIT

cargo build --release --locked -p sealpost -p sealpost-testkit >&2
# RELAY_SP=BINARY runs another build's relay (before/after pairs).
SP=${RELAY_SP:-target/release/sealpost}
# shellcheck source=bench/lib.sh
. bench/lib.sh
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
TICK=$(getconf CLK_TCK)
fail=0
for N in $COUNTS; do
    rm -rf "$T/relay"
    start_relay
    rss0=$(awk '/VmRSS/ {print $2}' "/proc/$RELAY/status")
    HOLD=$((IDLE_SECS + 5))
    target/release/sealpost-idle-agents --relay "$ADDR" --agents "$N" \
        --sources "$SOURCES" --hold "${HOLD}s" --pushes "$PUSHES" \
        >"$T/report.json" 2>"$T/tool.log" &
    TOOL=$!
    for _ in $(seq 600); do grep -q ready "$T/tool.log" && break; sleep 0.5; done
    sleep 2
    rss1=$(awk '/VmRSS/ {print $2}' "/proc/$RELAY/status")
    c0=$(awk '{print $14 + $15}' "/proc/$RELAY/stat")
    sleep "$IDLE_SECS"
    c1=$(awk '{print $14 + $15}' "/proc/$RELAY/stat")
    set +e
    wait "$TOOL"
    code=$?
    set -e
    [ "$code" -eq 0 ] || fail=1
    python3 - "$N" "$rss0" "$rss1" "$c0" "$c1" "$TICK" "$IDLE_SECS" "$T/report.json" <<'PY'
import json, sys
n, rss0, rss1, c0, c1, tick, secs = (float(x) for x in sys.argv[1:8])
r = json.load(open(sys.argv[8]))
print(f"N={int(n)}: relay RSS {rss0/1024:.1f} MiB -> {rss1/1024:.1f} MiB, "
      f"{(rss1-rss0)*1024/n:.0f} B per connection; idle CPU {100*(c1-c0)/tick/secs:.2f} % of a core; "
      f"push p50 {r['push_p50_ms']:.2f} ms, p99 {r['push_p99_ms']:.2f} ms, max {r['push_max_ms']:.2f} ms "
      f"({r['pushes']} pushes, {r['push_lost']} lost, {r['push_stray']} stray); "
      f"{r['subscribed']} subscribed in {r['setup_secs']:.1f} s, {r['failed']} failed")
PY
    grep -h "can hold" "$T/relay.log" | head -1 | sed 's/^.*INFO /# relay: /'
    kill "$RELAY" 2>/dev/null || true
    wait "$RELAY" 2>/dev/null || true
done
exit $fail
