#!/usr/bin/env bash
# Durable 1 KiB submissions to 1, 2 and 3 relay nodes on one PostgreSQL
# database (throwaway, as bench/relay-submit.sh POSTGRES=1), in one sitting:
# the same total of clients spread over the nodes (one `relay load` per
# node, all at once), aggregate msg/s, and CPU per message of each kind of
# process (all relay nodes together, PostgreSQL), from /proc.
#
#   bench/cluster-submit.sh
#   COUNT=100000 CLIENTS=24 NODES="1 2 3" bench/cluster-submit.sh
#
# Two cores cannot show scale-out: what carries over to more cores is the
# CPU each message costs per process, and what a node adds per core.
# Bounded: COUNT submissions per run and MAX_SECONDS; loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
COUNT=${COUNT:-60000}
CLIENTS=${CLIENTS:-24}
WINDOW=${WINDOW:-32}
NODES=${NODES:-1 2 3}
MAX_SECONDS=${MAX_SECONDS:-300}
PORT=${PORT:-17843}

if [[ -z ${SP:-} ]]; then
    cargo build --release --locked -q -p sealpost --features test-tools
    SP=$PWD/target/release/sealpost
fi
T=$(mktemp -d /var/tmp/sealpost-cluster-bench.XXXXXX)
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null && wait "$p" 2>/dev/null; done
    stop_postgres
    rm -rf "$T"
}
trap cleanup EXIT
export SEALPOST_LOG=${SEALPOST_LOG:-warn}

cpu_of() { LC_ALL=C awk -v t="$(getconf CLK_TCK)" '{ printf "%.3f", ($14 + $15) / t }' "/proc/$1/stat" 2>/dev/null || echo 0; }
pg_cpu() {
    local pid sum=0 p
    pid=$(head -1 "$PG_DATA/postmaster.pid")
    for p in $pid $(pgrep -P "$pid"); do
        sum=$(LC_ALL=C awk -v a="$sum" -v b="$(cpu_of "$p")" 'BEGIN { printf "%.3f", a + b }')
    done
    echo "$sum"
}
field() { sed -n "s/.*\"$1\":\([0-9.]*\).*/\1/p"; }

start_postgres
echo "# loadavg $(cut -d' ' -f1-3 /proc/loadavg)" >&2
for n in $NODES; do
    # A fresh database per run, the same server.
    db="n$n"
    "$PG_BIN/psql" -X -q "$PG_URL" -c "CREATE DATABASE $db"
    url="${PG_URL%/*}/$db"
    nodes=() addrs=()
    for i in $(seq "$n"); do
        relay_at "$T/run$n-node$i" "127.0.0.$((i + 1))" "$((PORT + i))" --database "$url" \
            ${KEY:+--signing-key "$KEY"}
        nodes+=("$RELAY") addrs+=("$AT")
        [[ $i == 1 ]] && KEY=$T/run$n-node1/relay-signing.key
    done
    KEY=
    per=$((COUNT / n)) clients=$((CLIENTS / n))
    c0=() ; for p in "${nodes[@]}"; do c0+=("$(cpu_of "$p")"); done
    p0=$(pg_cpu)
    t0=$(date +%s.%N)
    loads=()
    for a in "${addrs[@]}"; do
        "$SP" --json relay load --address "$a" --count "$per" --size 1024 --clients "$clients" \
            --window "$WINDOW" --max-seconds "$MAX_SECONDS" >"$T/load-$n-${#loads[@]}.json" &
        loads+=($!)
    done
    for l in "${loads[@]}"; do wait "$l"; done
    t1=$(date +%s.%N)
    relay_cpu=0
    for i in "${!nodes[@]}"; do
        relay_cpu=$(LC_ALL=C awk -v a="$relay_cpu" -v b="$(cpu_of "${nodes[$i]}")" -v c="${c0[$i]}" 'BEGIN { printf "%.3f", a + b - c }')
    done
    p1=$(pg_cpu)
    total=$((per * n))
    LC_ALL=C awk -v n="$n" -v total="$total" -v t0="$t0" -v t1="$t1" -v rc="$relay_cpu" -v p0="$p0" -v p1="$p1" 'BEGIN {
        rate = total / (t1 - t0)
        printf "sealpost nodes_%d_msgs_per_sec %.0f msg/s\n", n, rate
        printf "sealpost nodes_%d_relay_cpu_per_msg %.1f us (all nodes)\n", n, rc * 1e6 / total
        printf "sealpost nodes_%d_postgres_cpu_per_msg %.1f us\n", n, (p1 - p0) * 1e6 / total
    }'
    for f in "$T"/load-"$n"-*.json; do
        echo "sealpost nodes_${n}_p99_one_node $(field p99_ms <"$f") ms"
    done
    for p in "${nodes[@]}"; do
        echo "sealpost nodes_${n}_peak_rss $(( $(awk '/VmHWM/ { print $2 }' "/proc/$p/status") / 1024 )) MiB"
        kill "$p"; wait "$p" 2>/dev/null || true
    done
done
