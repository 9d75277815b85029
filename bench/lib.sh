# Shared by the bench scripts (sourced): they set SP (the sealpost binary),
# T (their scratch directory), PORT and the PIDS array first.

# Starts a relay on $2:$3 with its data in $1 (more arguments go to
# `relay serve`), adds it to PIDS, sets RELAY to its pid and AT to its
# address once it accepts connections; exits if it does not start.
relay_at() {
    local data=$1 ip=$2 port=$3
    shift 3
    "$SP" relay serve --data "$data" --listen "$ip:$port" "$@" >/dev/null 2>>"$T/relay.log" &
    RELAY=$!
    PIDS+=("$RELAY")
    for _ in $(seq 100); do
        AT=$("$SP" relay address --data "$data" --listen "$ip:$port" 2>/dev/null) &&
            (exec 3<>"/dev/tcp/$ip/$port") 2>/dev/null && return
        sleep 0.1
    done
    echo "relay at $ip:$port did not start" >&2
    exit 1
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
