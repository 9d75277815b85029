#!/usr/bin/env bash
# The adversary soak and the crash campaign, on the release binaries, all
# on 127.0.0.1 (issue 6; docs/RELIABILITY.md holds the latest figures).
#
#   bench/adversary.sh                 # soak, then crash campaign
#   PHASES=soak bench/adversary.sh     # only the soak
#   PHASES=crash bench/adversary.sh    # only the crash campaign
#   RELAYS=2 bench/adversary.sh        # two relays (127.0.0.2, .3): homes
#                                      # alternate, agents forward through
#                                      # their own, both hostile and killed
#   CLUSTER=3 bench/adversary.sh       # one relay as 3 nodes (127.0.0.2-4)
#                                      # on a throwaway PostgreSQL and Garage;
#                                      # homes alternate between nodes; half
#                                      # the kills take a node; PostgreSQL
#                                      # crashed at 30 % of the hostile time
#                                      # (back 3 s later), the object store
#                                      # stopped at 40 % for STORE_DOWN (30s)
#
# Soak: IDENTITIES agents exchange MESSAGES messages (in `send --repeat`
# batches) and FILES files of mixed sizes (0 B, 1 B, chunk and piece edges,
# random up to MAX_FILE) through `sealpost relay serve --hostile` with every
# fault class at FAULTS (2 %, the blob classes 5 %: few pieces are read) for
# HOSTILE_FOR; then the relay restarts honest on
# the same data (it "heals") and delivery must finish within SETTLE.
# Crash campaign: the same load while the relay and the agents are SIGKILLed
# KILLS times at seeded random moments and restarted.
#
# Each phase prints: sent; faults injected by class (and how many of each
# an endpoint recorded catching); kills; delivered with a valid receipt;
# failed with a reason; pending after heal, lost, delivered twice, tampered
# content accepted, forged refusal or rejection accepted (each must be 0).
# Exits non-zero on any violation. Bounded: the counts above, SETTLE.
set -euo pipefail
cd "$(dirname "$0")/.."
PHASES=${PHASES:-"soak crash"}
SEED=${SEED:-2026}
IDENTITIES=${IDENTITIES:-4}
RELAYS=${RELAYS:-1}
CLUSTER=${CLUSTER:-0}
STORE_DOWN=${STORE_DOWN:-30s}
MESSAGES=${MESSAGES:-10000}
FILES=${FILES:-50}
MAX_FILE=${MAX_FILE:-8388608}
FAULTS=${FAULTS:-all=0.02,blob-flip=0.05,blob-truncate=0.05}
HOSTILE_FOR=${HOSTILE_FOR:-60s}
CRASH_FOR=${CRASH_FOR:-150s}
KILLS=${KILLS:-120}
SETTLE=${SETTLE:-10m}
RETRANSMIT=${RETRANSMIT:-10s}
OUT=${OUT:-$(mktemp -d /tmp/sealpost-adversary.XXXXXX)}

# Two builds: with both packages in one, `--features sealpost/test-tools`
# does not reach the `sealpost` binary, which then has no `--hostile`.
cargo build --release --locked -p sealpost --features test-tools >&2
cargo build --release --locked -p sealpost-testkit >&2
target/release/sealpost relay serve --help | grep -q -- --hostile || {
    echo "target/release/sealpost was built without the test-tools feature" >&2
    exit 2
}
echo "# sealpost adversary: seed $SEED, $RELAYS relay(s) ($CLUSTER cluster nodes), $IDENTITIES identities, $MESSAGES messages + $FILES files (≤ $MAX_FILE B), faults $FAULTS; scratch $OUT"
status=0
for phase in $PHASES; do
    case $phase in
        soak) kills=0; for_=$HOSTILE_FOR ;;
        crash) kills=$KILLS; for_=$CRASH_FOR ;;
        *) echo "unknown phase $phase" >&2; exit 2 ;;
    esac
    echo
    echo "## $phase (hostile for $for_, $kills kills)"
    start=$(date +%s)
    target/release/sealpost-adversary \
        --sealpost target/release/sealpost --dir "$OUT/$phase" --seed "$SEED" \
        --relays "$RELAYS" --cluster-nodes "$CLUSTER" --store-down "$STORE_DOWN" --identities "$IDENTITIES" --messages "$MESSAGES" --files "$FILES" \
        --max-file "$MAX_FILE" --faults "$FAULTS" --hostile-for "$for_" \
        --kills "$kills" --retransmit-after "$RETRANSMIT" --settle-timeout "$SETTLE" \
        --json "$OUT/$phase.json" || status=$?
    echo "wall time: $(( $(date +%s) - start )) s; report: $OUT/$phase.json"
done
exit $status
