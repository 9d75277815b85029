#!/usr/bin/env bash
# Durable submissions per second to a sealpost relay on 127.0.0.1, side by
# side with Postfix's durable accepts (../shared/bench/anchors/postfix.sh) in
# the same session, then this sitting's bounds (limits.sh: fdatasync and
# group commit rates, a loopback round trip); ANCHOR= skips both.
#
#   bench/relay-submit.sh
#   COUNT_1K=100000 COUNT_64K=10000 CLIENTS=16 bench/relay-submit.sh
#   SP=../other/target/release/sealpost ANCHOR= bench/relay-submit.sh
#   POSTGRES=1 bench/relay-submit.sh     # the relay's ledger on PostgreSQL
#   DIR=/dev/shm ANCHOR= bench/relay-submit.sh   # fsync nearly free
#
# POSTGRES=1 starts a throwaway PostgreSQL (Debian's binaries, initdb as the
# postgres user in /var/tmp, fsync on, a free loopback port), runs the relay
# with --database on it, and prints PostgreSQL's own CPU per message beside
# the relay's (every sealpost accept there waits for its commit, with
# synchronous_commit on).
#
# Every submission counts only once the relay answered Accepted, which it
# does after the SQLite commit (synchronous=FULL, so after fsync) that holds
# it. Output lines: "<system> <figure> <value> <unit>", then "ratio" lines.
# Bounded: COUNT_* submissions and MAX_SECONDS per run; loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
COUNT_1K=${COUNT_1K:-50000}
COUNT_64K=${COUNT_64K:-5000}
CLIENTS=${CLIENTS:-16}
WINDOW=${WINDOW:-32}
LONE=${LONE:-1000}
MAX_SECONDS=${MAX_SECONDS:-300}
PORT=${PORT:-17443}
# ANCHOR= (empty) skips Postfix (before/after pairs of sealpost alone).
ANCHOR=${ANCHOR-../shared/bench/anchors/postfix.sh}

# SP=/path/to/sealpost measures that binary instead (before/after pairs).
if [[ -z ${SP:-} ]]; then
    cargo build --release --locked -q -p sealpost --features test-tools
    SP=$PWD/target/release/sealpost
fi
# DIR= where the relay's data goes (default /var/tmp, a disk; /dev/shm,
# memory, makes fsync nearly free: the group commit's batches then shrink).
T=$(mktemp -d "${DIR:-/var/tmp}/sealpost-relay-bench.XXXXXX")
RELAY_PID=
PG_DATA=
cleanup() {
    [[ -n $RELAY_PID ]] && kill "$RELAY_PID" 2>/dev/null && wait "$RELAY_PID" 2>/dev/null
    stop_postgres
    rm -rf "$T"
}
trap cleanup EXIT

DB_FLAGS=()
if [[ -n ${POSTGRES:-} ]]; then
    start_postgres
    DB_FLAGS=(--database "$PG_URL")
fi
# CPU seconds (user+system) of every process of the PostgreSQL server.
pg_cpu() {
    [[ -z $PG_DATA ]] && { echo 0; return; }
    local pid tck=$(getconf CLK_TCK) sum=0
    pid=$(head -1 "$PG_DATA/postmaster.pid")
    for p in $pid $(pgrep -P "$pid"); do
        sum=$((sum + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0)))
    done
    LC_ALL=C awk -v s="$sum" -v t="$tck" 'BEGIN { printf "%.2f", s / t }'
}
relay_cpu() {
    LC_ALL=C awk -v t="$(getconf CLK_TCK)" '{ printf "%.2f", ($14 + $15) / t }' "/proc/$RELAY_PID/stat"
}

MPORT=$((PORT + 1))
"$SP" relay serve --data "$T/relay" --listen "127.0.0.1:$PORT" --metrics "127.0.0.1:$MPORT" "${DB_FLAGS[@]}" >/dev/null 2>"$T/relay.log" &
RELAY_PID=$!
for _ in $(seq 100); do
    ADDR=$("$SP" relay address --data "$T/relay" --listen "127.0.0.1:$PORT" 2>/dev/null) && break
    sleep 0.1
done
sleep 0.3
echo "# relay at $ADDR, loadavg $(cut -d' ' -f1-3 /proc/loadavg)" >&2

field() { sed -n "s/.*\"$1\":\([0-9.]*\).*/\1/p"; }
# The relay's commit histograms (writes per commit, commit latency), saved
# to $1 for batches() to compare.
scrape() {
    python3 -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=5).read().decode())' "$MPORT" >"$1" 2>/dev/null || : >"$1"
}
# The group commit over one run (the difference of two scrapes): commits,
# writes per commit (mean, and the bucket holding the 50th/90th/99th
# percentile of writes), commit latency percentiles (bucket bounds).
batches() { # name before after
    python3 - "$@" <<'PY'
import re, sys
name, a, b = sys.argv[1:4]
def hist(path, metric):
    h = {}
    for line in open(path):
        m = re.match(r'sealpost_relay_%s_(bucket\{le="([^"]+)"\}|count|sum) (\S+)' % metric, line)
        if m:
            h[m.group(2) or m.group(1)] = float(m.group(3))
    return h
def delta(metric):
    x, y = hist(a, metric), hist(b, metric)
    return {k: y[k] - x.get(k, 0.0) for k in y}
def pct(d, q):
    n = d.get("count", 0)
    les = sorted((float(k), v) for k, v in d.items() if k not in ("count", "sum") and k != "+Inf")
    for le, c in les:
        if c >= q * n:
            return le
    return float("inf")
w, l = delta("commit_batch_writes"), delta("commit_duration_seconds")
n = w.get("count", 0)
if n == 0:
    print(f"sealpost {name}_commits 0 (no group commit: PostgreSQL)")
    sys.exit()
print(f"sealpost {name}_commits {n:.0f} commits")
print(f"sealpost {name}_writes_per_commit mean {w['sum'] / n:.1f}, p50 <= {pct(w, .5):.0f}, p90 <= {pct(w, .9):.0f}, p99 <= {pct(w, .99):.0f}")
print(f"sealpost {name}_commit_latency p50 <= {pct(l, .5) * 1000:.1f} ms, p99 <= {pct(l, .99) * 1000:.1f} ms, mean {l['sum'] / l['count'] * 1000:.2f} ms")
PY
}
run() { # name count size clients window
    local out c0 p0
    c0=$(relay_cpu); p0=$(pg_cpu); scrape "$T/m0"
    out=$("$SP" --json relay load --address "$ADDR" --count "$2" --size "$3" --clients "$4" --window "$5" --max-seconds "$MAX_SECONDS")
    echo "sealpost $1_relay_cpu_per_msg $(LC_ALL=C awk -v a="$c0" -v b="$(relay_cpu)" -v n="$2" 'BEGIN { printf "%.1f", (b - a) * 1e6 / n }') us"
    [[ -n $PG_DATA ]] && echo "sealpost $1_postgres_cpu_per_msg $(LC_ALL=C awk -v a="$p0" -v b="$(pg_cpu)" -v n="$2" 'BEGIN { printf "%.1f", (b - a) * 1e6 / n }') us"
    echo "sealpost $1_msgs_per_sec $(echo "$out" | field msgs_per_sec) msg/s"
    echo "sealpost $1_mb_per_sec $(echo "$out" | field mb_per_sec) MB/s"
    echo "sealpost $1_p50 $(echo "$out" | field p50_ms) ms"
    echo "sealpost $1_p99 $(echo "$out" | field p99_ms) ms"
    scrape "$T/m1"
    batches "$1" "$T/m0" "$T/m1"
}
run "submit_1k_${CLIENTS}clients" "$COUNT_1K" 1024 "$CLIENTS" "$WINDOW" | tee "$T/sp.out"
run "submit_64k_${CLIENTS}clients" "$COUNT_64K" 65536 "$CLIENTS" 4 | tee -a "$T/sp.out"
run "submit_1k_lone" "$LONE" 1024 1 1 | tee -a "$T/sp.out"
RSS=$(awk '/VmHWM/ { print $2 }' "/proc/$RELAY_PID/status")
echo "sealpost relay_peak_rss $((RSS / 1024)) MiB"
kill "$RELAY_PID"; wait "$RELAY_PID" 2>/dev/null || true; RELAY_PID=

[[ -z $ANCHOR ]] && exit 0
echo "# running $ANCHOR (MODES=maildir N=2000)" >&2
MODES=maildir bash "$ANCHOR" | tee "$T/pf.out"

sp() { awk -v k="$1" '$1 == "sealpost" && $2 == k { print $3 }' "$T/sp.out"; }
pf() { awk -v k="$1" '$1 == "postfix" && $2 == k { print $3 }' "$T/pf.out"; }
r() { LC_ALL=C awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.1f", a / b; else print "n/a" }'; }
echo "ratio submit_1k/postfix_accept_1k $(r "$(sp "submit_1k_${CLIENTS}clients_msgs_per_sec")" "$(pf maildir_1KiB_smtp_accept_rate)") x"
echo "ratio submit_64k/postfix_accept_64k $(r "$(sp "submit_64k_${CLIENTS}clients_msgs_per_sec")" "$(pf maildir_64KiB_smtp_accept_rate)") x"
# The sitting's bounds: one fdatasync a record, and group commit as the
# relay does it (records per fdatasync in batches of 16 and 256).
sitting_limits 'fsync-tmp-append-fdatasync-1KiB|groupcommit-tmp-(16|256)x1KiB-per-fdatasync|tcp-pingpong-c-64B'
