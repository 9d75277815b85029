#!/usr/bin/env bash
# Hostile clients against a release relay on 127.0.0.1 (issue 21;
# docs/RELIABILITY.md holds the latest figures): CONNECTIONS hostile
# connections from SOURCES loopback addresses at every stage (TCP only, half
# a TLS handshake, Hello then idle, a 1 MiB frame head with no body, a body
# one byte per 200 ms), a request storm, quota stuffing, registrations en
# masse and blob probing, held for HOLD, while HONEST clients do
# submit -> fetch -> ack rounds. Prints the attack report, the relay's peak
# RSS (VmHWM) and its counters; exits non-zero if an honest round failed, a
# probe learnt something, or the relay's peak RSS passed RSS_LIMIT_MB.
#
#   bench/hostile-clients.sh
#   CONNECTIONS=8000 SOURCES=32 HOLD=60s bench/hostile-clients.sh
#
# Bounded: the counts above and HOLD; everything on 127.0.0.x.
set -euo pipefail
cd "$(dirname "$0")/.."
SEED=${SEED:-21}
CONNECTIONS=${CONNECTIONS:-4096}
SOURCES=${SOURCES:-16}
HOLD=${HOLD:-30s}
HONEST=${HONEST:-4}
RSS_LIMIT_MB=${RSS_LIMIT_MB:-256}
PORT=${PORT:-47543}
T=$(mktemp -d /tmp/sealpost-hostile-clients.XXXXXX)
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true; rm -rf "$T"' EXIT

cargo build --release --locked -p sealpost -p sealpost-testkit >&2
SP=target/release/sealpost
# shellcheck source=bench/lib.sh
. bench/lib.sh
MPORT=$((PORT + 1))
start_relay --metrics "127.0.0.1:$MPORT"
echo "# relay pid $RELAY at $ADDR; idle RSS $(awk '/VmRSS/ {print $2}' "/proc/$RELAY/status") KiB"
set +e
target/release/sealpost-hostile-clients --relay "$ADDR" --seed "$SEED" \
    --connections "$CONNECTIONS" --sources "$SOURCES" --hold "$HOLD" --honest "$HONEST" \
    >"$T/report.json"
code=$?
set -e
cat "$T/report.json"
peak=$(awk '/VmHWM/ {print $2}' "/proc/$RELAY/status")
echo "relay peak RSS: $((peak / 1024)) MiB (limit $RSS_LIMIT_MB MiB)"
python3 - "$MPORT" <<'PY' || true
import sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=5).read().decode()
for line in text.splitlines():
    for name in ("connections_total", "connections_refused_total", "connections_refused_per_address_total",
                 "connections_evicted_total", "timeouts_total", "rate_limited_total", "bad_frames_total",
                 "accepted_total", "refusals_total{reason=\"over_quota\"}", "storage_errors_total"):
        if line.startswith("sealpost_relay_" + name + " "):
            print("relay", name, line.split()[1])
PY
if [ "$code" -ne 0 ]; then
    echo "FAILED: an honest round failed or a probe learnt something (exit $code)"
    exit 1
fi
if [ "$((peak / 1024))" -gt "$RSS_LIMIT_MB" ]; then
    echo "FAILED: relay peak RSS over $RSS_LIMIT_MB MiB"
    exit 1
fi
echo "OK"
