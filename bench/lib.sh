# Shared by the bench scripts (sourced): they set SP (the sealpost binary),
# T (their scratch directory), PORT and the PIDS array first.

# Starts a relay on $2:$3 with its data in $1 (more arguments go to
# `relay serve`), adds it to PIDS, sets RELAY to its pid and AT to its
# address once it accepts connections; exits if it does not start. With
# the array WRAP set, the relay runs under that command (a profiler; it is
# given 60 s instead of 10 to start).
relay_at() {
    local data=$1 ip=$2 port=$3 tries=100
    shift 3
    [[ -n ${WRAP+x} ]] && tries=600
    ${WRAP+"${WRAP[@]}"} "$SP" relay serve --data "$data" --listen "$ip:$port" "$@" >/dev/null 2>>"$T/relay.log" &
    RELAY=$!
    PIDS+=("$RELAY")
    for _ in $(seq "$tries"); do
        AT=$("$SP" relay address --data "$data" --listen "$ip:$port" 2>/dev/null) &&
            (exec 3<>"/dev/tcp/$ip/$port") 2>/dev/null && return
        sleep 0.1
    done
    echo "relay at $ip:$port did not start" >&2
    exit 1
}

# Starts an agent in the background on a home (`--home DIR`, then any
# arguments for `agent`) and waits for its socket; its pid joins PIDS, its
# log goes to $T/agents.log.
start_agent() { # --home dir [agent args...]
    "$SP" "$1" "$2" agent "${@:3}" >/dev/null 2>>"$T/agents.log" &
    PIDS+=($!)
    local home=$2
    for _ in $(seq 200); do [[ -S $home/agent.sock ]] && return; sleep 0.05; done
    echo "agent for $home did not start" >&2
    exit 1
}

# How many of a home's deliveries are delivered (`--home DIR`), from the
# totals `status` reads.
delivered_at() { # --home dir
    "$SP" "$@" --json status --limit 0 | python3 -c 'import json,sys; print(json.load(sys.stdin)["totals"].get("delivered", 0))'
}

# Waits until a home (`--home DIR`) counts N delivered, checking every
# second; exits if that takes over SECONDS, saying what was awaited.
wait_delivered() { # n seconds what --home dir
    local n=$1 seconds=$2 what=$3 deadline
    shift 3
    deadline=$(($(date +%s) + seconds))
    while [[ $(delivered_at "$@") -lt $n ]]; do
        [[ $(date +%s) -lt $deadline ]] || { echo "$what was not delivered within ${seconds}s" >&2; exit 1; }
        sleep 1
    done
}

# Starts a relay on 127.0.0.1:$PORT with its data in $T/relay (extra
# arguments go to `relay serve`, e.g. --metrics): relay_at, with ADDR set
# to its address.
start_relay() {
    relay_at "$T/relay" 127.0.0.1 "$PORT" "$@"
    ADDR=$AT
}

# Prints the relay's blob metrics from its metrics port ($1): reads served
# from the pieces kept in memory or from the blob files (the device:
# pieces are written with O_DIRECT), and uploads held back for a
# streaming recipient.
relay_blob_metrics() {
    python3 - "$1" <<'PY' || true
import sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=5).read().decode()
for line in text.splitlines():
    for name in ("blob_reads_memory_total", "blob_reads_disk_total", "blob_runs_paced_total", "blob_paced_microseconds_total"):
        if line.startswith("sealpost_relay_" + name + " "):
            print("sealpost relay_" + name, line.split()[1])
PY
}

# Starts a throwaway PostgreSQL (Debian's binaries, initdb as the postgres
# user under $T, fsync on, a free loopback port); sets PG_URL and PG_DATA.
start_postgres() {
    PG_BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
    local port
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    chmod 755 "$T"
    PG_DATA=$T/pg
    mkdir -p "$PG_DATA" "$T/pgsock" && chown postgres: "$PG_DATA" "$T/pgsock"
    runuser -u postgres -- "$PG_BIN/initdb" -A trust -U sealpost -E UTF8 -D "$PG_DATA" >/dev/null
    runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$T/pgsock/pg.log" -w \
        -o "-h 127.0.0.1 -p $port -k $T/pgsock -c fsync=on -c max_connections=200 -c shared_buffers=256MB" start >/dev/null
    PG_URL="postgres://sealpost@127.0.0.1:$port/postgres"
    echo "# PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}') at 127.0.0.1:$port" >&2
}
stop_postgres() {
    [[ -n ${PG_DATA:-} ]] && runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast stop >/dev/null 2>&1
    PG_DATA=
}

# Starts a throwaway Garage node (S3; data_fsync and metadata_fsync on) in
# $T/garage with a bucket "sealpost" and a key for it; adds it to PIDS and
# sets GARAGE_PID, S3_ENDPOINT, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY.
start_garage() {
    local g=${SEALPOST_GARAGE:-$HOME/.cache/sealpost/tools/garage-2.5.0/bin/garage}
    [[ -x $g ]] || { echo "no garage binary ($g): cargo install garage --version 2.5.0 --locked" >&2; exit 1; }
    local s3 rpc d=$T/garage
    s3=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    rpc=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    mkdir -p "$d"
    cat >"$d/garage.toml" <<TOML
metadata_dir = "$d/meta"
data_dir = "$d/data"
db_engine = "sqlite"
metadata_fsync = true
data_fsync = true
compression_level = "none"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$rpc"
rpc_public_addr = "127.0.0.1:$rpc"
rpc_secret = "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$s3"
root_domain = ".s3.garage.localhost"
TOML
    GARAGE=(env "$g" -c "$d/garage.toml")
    "${GARAGE[@]}" server >"$d/server.log" 2>&1 &
    GARAGE_PID=$!
    PIDS+=("$GARAGE_PID")
    for _ in $(seq 100); do "${GARAGE[@]}" status >/dev/null 2>&1 && break; sleep 0.1; done
    local id key
    id=$("${GARAGE[@]}" node id -q 2>/dev/null | cut -d@ -f1)
    "${GARAGE[@]}" layout assign -z dc1 -c 10G "$id" >/dev/null
    "${GARAGE[@]}" layout apply --version 1 >/dev/null
    "${GARAGE[@]}" bucket create sealpost >/dev/null
    key=$("${GARAGE[@]}" key create sealpost)
    export AWS_ACCESS_KEY_ID=$(awk '/^Key ID:/ { print $3 }' <<<"$key")
    export AWS_SECRET_ACCESS_KEY=$(awk '/^Secret key:/ { print $3 }' <<<"$key")
    "${GARAGE[@]}" bucket allow --read --write --owner sealpost --key sealpost >/dev/null
    S3_ENDPOINT="http://127.0.0.1:$s3"
    echo "# Garage $("$g" --version 2>/dev/null | awk '{print $2}') at $S3_ENDPOINT" >&2
}

# The object store's own rates, the bound for blobs kept there: $1 MiB
# PUT as objects of 8 MiB (a relay's runs are at most that), then GET
# back, with curl's AWS signatures. Prints "limit" lines.
s3_rates() {
    local mib=$1 n i t0 t1 t2
    n=$(( (mib + 7) / 8 ))
    head -c $((8 << 20)) /dev/urandom >"$T/s3-object"
    local sig=(--aws-sigv4 "aws:amz:garage:s3" --user "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY"
        -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" -s -f)
    t0=$(date +%s.%N)
    for i in $(seq "$n"); do curl "${sig[@]}" -T "$T/s3-object" "$S3_ENDPOINT/sealpost/bench/$i" >/dev/null; done
    t1=$(date +%s.%N)
    for i in $(seq "$n"); do curl "${sig[@]}" "$S3_ENDPOINT/sealpost/bench/$i" -o /dev/null; done
    t2=$(date +%s.%N)
    for i in $(seq "$n"); do curl "${sig[@]}" -X DELETE "$S3_ENDPOINT/sealpost/bench/$i" >/dev/null; done
    LC_ALL=C awk -v n="$n" -v t0="$t0" -v t1="$t1" -v t2="$t2" 'BEGIN {
        p = n * 8 / (t1 - t0); g = n * 8 / (t2 - t1)
        printf "limit s3_put_8MiB_objects %.1f MiB/s\n", p
        printf "limit s3_get_8MiB_objects %.1f MiB/s\n", g
        printf "limit s3_bound_put_then_get %.1f MiB/s\n", 1 / (1 / p + 1 / g)
    }'
}

# The same sitting's bounds (issue 20): runs ../shared/bench/anchors/limits.sh
# (about a minute; its own loads are bounded) into $T/limits.out and prints
# its lines whose figure matches the extended regex $1, as they are.
sitting_limits() { # regex
    echo "# running limits.sh (this sitting's bounds)" >&2
    bash ../shared/bench/anchors/limits.sh >"$T/limits.out" 2>/dev/null || true
    grep -E "^limit ($1)" "$T/limits.out" || echo "# limits.sh printed none of: $1" >&2
}
# A figure from $T/limits.out.
limit_of() { awk -v k="$1" '$1 == "limit" && $2 == k { print $3 }' "$T/limits.out"; }
