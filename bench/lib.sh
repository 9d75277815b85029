# Shared by the bench scripts (sourced): they set SP (the sealpost binary),
# T (their scratch directory), PORT and the PIDS array first.

# Starts a relay on 127.0.0.1:$PORT with its data in $T/relay (extra
# arguments go to `relay serve`, e.g. --metrics), adds it to PIDS, sets
# RELAY to its pid and ADDR to its address once it accepts connections.
start_relay() {
    "$SP" relay serve --data "$T/relay" --listen "127.0.0.1:$PORT" "$@" >/dev/null 2>"$T/relay.log" &
    RELAY=$!
    PIDS+=("$RELAY")
    for _ in $(seq 100); do
        ADDR=$("$SP" relay address --data "$T/relay" --listen "127.0.0.1:$PORT" 2>/dev/null) &&
            (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
        sleep 0.1
    done
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
