#!/usr/bin/env bash
# nncp-via.sh - NNCP through a transitional node: the anchor for sealpost's
# relays that forward (issue 15), beside ../shared/bench/anchors/nncp.sh
# (which measures alice -> bob directly).
#
# Three throw-away NNCP nodes, alice, hub and bob, in a temporary directory;
# hub and bob run nncp-daemon on 127.0.0.1 only. One SIZE_MB MiB file of
# random data goes alice -> hub -> bob with NNCP's defaults (fsync on,
# online checksumming on):
#   nncp-file -via hub      (the packet for bob, wrapped in one for hub)
#   alice: nncp-call hub    (until hub confirmed the whole packet: DONE)
#   hub:   nncp-toss        (unwraps the transitional packet into its
#                            outbound queue for bob)
#   hub:   nncp-call bob    (until bob confirmed it)
#   bob:   nncp-toss        (decrypts and writes the file)
# and compares the received file's sha256 with the source. The steps run
# one after another (NNCP moves a packet on only when its node's operator
# runs the next command), so the total is their sum; the transfer steps end
# at the sender's last DONE (log timestamp), not at nncp-call's idle
# deadline.
#
# Usage:  SIZE_MB=1024 bash bench/nncp-via.sh   (installs nncp with apt-get
#         if missing and root)
# Env:    SIZE_MB (default 256), TMPDIR (needs ~5*SIZE_MB MiB),
#         CALL_TIMEOUT_S (default 900), KEEP_TMP=1 keeps the directory.
# Output: "nncp-via <figure> <value> <unit>" lines on stdout; exits non-zero
#         if any step fails or the checksum differs.
# Traffic: only TCP to 127.0.0.1.
set -euo pipefail
export LC_ALL=C

SIZE_MB=${SIZE_MB:-256}
CALL_TIMEOUT_S=${CALL_TIMEOUT_S:-900}
case "$SIZE_MB" in '' | *[!0-9]*) echo "SIZE_MB must be a positive integer" >&2; exit 2 ;; esac

log() { printf '[nncp-via.sh] %s\n' "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }
fig() { printf 'nncp-via %s %s %s\n' "$1" "$2" "$3"; }
now() { printf '%s' "$EPOCHREALTIME"; }
fsub() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a - b }'; }
fdiv() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "inf" }'; }

if ! command -v nncp-file >/dev/null 2>&1; then
	[ "$(id -u)" -eq 0 ] || die "nncp is not installed and we are not root (apt-get install nncp)"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nncp >&2
fi
log "using: $(nncp-file -version 2>&1 | head -n1); SIZE_MB=$SIZE_MB"

W=$(mktemp -d "${TMPDIR:-/tmp}/nncp-via.XXXXXX")
PIDS=()
cleanup() {
	local rc=$?
	for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
	if [ "${KEEP_TMP:-0}" = 1 ]; then log "kept $W"; else rm -rf -- "$W"; fi
	exit "$rc"
}
trap cleanup EXIT

for n in alice hub bob; do
	nncp-cfgnew -nocomments >"$W/$n.hjson"
	nncp-cfgdir -cfg "$W/$n.hjson" -dump "$W/$n.cfg"
	rm -f "$W/$n.hjson"
	rm -rf "$W/$n.cfg/mcd-listen" "$W/$n.cfg/mcd-send" "$W/$n.cfg/yggdrasil-aliases"
	mkdir -p "$W/$n.spool"
	echo "$W/$n.spool" >"$W/$n.cfg/spool"
	echo "$W/$n.log" >"$W/$n.cfg/log"
	touch "$W/$n.cfg/noprogress"
done
# neigh FROM TO: FROM knows TO's keys.
neigh() {
	mkdir -p "$W/$1.cfg/neigh/$2"
	for k in id exchpub signpub noisepub; do cp "$W/$2.cfg/neigh/self/$k" "$W/$1.cfg/neigh/$2/$k"; done
}
neigh alice hub; neigh alice bob
neigh hub alice; neigh hub bob
neigh bob hub; neigh bob alice
mkdir -p "$W/bob.incoming"
echo "$W/bob.incoming" >"$W/bob.cfg/neigh/alice/incoming"
ID() { cat "$W/$1.cfg/self/id"; }

listening() {
	local hex
	hex=$(printf '%04X' "$1")
	awk -v p=":$hex" '$4 == "0A" && substr($2, length($2) - 4) == p { f = 1 } END { exit !f }' /proc/net/tcp
}
# daemon NODE: starts NODE's nncp-daemon on a free 127.0.0.1 port; sets PORT.
daemon() {
	PORT=""
	for _ in 1 2 3 4 5 6 7 8 9 10; do
		local p=$((20000 + RANDOM % 40000)) pid
		listening "$p" && continue
		timeout $((CALL_TIMEOUT_S * 4 + 300)) nncp-daemon -cfg "$W/$1.cfg" -bind "127.0.0.1:$p" -quiet \
			>"$W/daemon-$1.out" 2>&1 &
		pid=$!
		for _ in $(seq 1 50); do listening "$p" && break; sleep 0.1; done
		if listening "$p" && kill -0 "$pid" 2>/dev/null; then PORT=$p; PIDS+=("$pid"); return; fi
		kill -TERM "$pid" 2>/dev/null || true
	done
	die "could not start $1's nncp-daemon"
}
daemon hub
mkdir -p "$W/alice.cfg/neigh/hub/addrs"
echo "127.0.0.1:$PORT" >"$W/alice.cfg/neigh/hub/addrs/local"
daemon bob
mkdir -p "$W/hub.cfg/neigh/bob/addrs"
echo "127.0.0.1:$PORT" >"$W/hub.cfg/neigh/bob/addrs/local"

pkts() { find "$1" -maxdepth 1 -type f ! -name '*.part' ! -name '*.nock' -printf '%f\n' 2>/dev/null; }
npkts() { pkts "$1" | wc -l; }
# call FROM TO: one nncp-call until the last DONE; sets XFER_S.
call() {
	local t0 rc=0 last
	t0=$(now)
	timeout "$CALL_TIMEOUT_S" nncp-call -cfg "$W/$1.cfg" -log "$W/call-$1.log" -quiet \
		-onlinedeadline 10 "$2" >"$W/call-$1.out" 2>&1 || rc=$?
	[ "$rc" -eq 0 ] || { cat "$W/call-$1.out" >&2; die "nncp-call $1 -> $2 exited $rc"; }
	grep -q '^Who: sp-done$' "$W/call-$1.log" || die "$1 -> $2: no packet confirmed (sp-done)"
	[ "$(npkts "$W/$1.spool/$(ID "$2")/tx")" -eq 0 ] || die "$1 -> $2: packets left in the tx queue"
	last=$(awk '/^When: /{w=$2} /^Who: sp-done$/{d=w} END{print d}' "$W/call-$1.log")
	XFER_S=$(fsub "$(date -d "$last" +%s.%N)" "$t0")
}
toss() { # NODE: sets TOSS_S
	local t0 rc=0
	t0=$(now)
	timeout "$CALL_TIMEOUT_S" nncp-toss -cfg "$W/$1.cfg" -quiet >"$W/toss-$1.out" 2>&1 || rc=$?
	[ "$rc" -eq 0 ] || { cat "$W/toss-$1.out" >&2; die "nncp-toss on $1 exited $rc"; }
	TOSS_S=$(fsub "$(now)" "$t0")
}

log "generating $SIZE_MB MiB of random data"
mkdir -p "$W/src"
head -c "$((SIZE_MB * 1024 * 1024))" /dev/urandom >"$W/src/bulk.bin"
SRC_SUM=$(sha256sum <"$W/src/bulk.bin" | cut -d' ' -f1)

t0=$(now)
timeout "$CALL_TIMEOUT_S" nncp-file -cfg "$W/alice.cfg" -quiet -via hub "$W/src/bulk.bin" bob:bulk.bin
FILE_S=$(fsub "$(now)" "$t0")
[ "$(npkts "$W/alice.spool/$(ID hub)/tx")" -eq 1 ] || die "expected one packet for hub in alice's queue"
log "alice -> hub"
call alice hub
A_XFER=$XFER_S
log "hub: toss (transit)"
toss hub
HUB_TOSS=$TOSS_S
[ "$(npkts "$W/hub.spool/$(ID bob)/tx")" -eq 1 ] || die "hub did not queue the packet for bob"
log "hub -> bob"
call hub bob
H_XFER=$XFER_S
log "bob: toss"
toss bob
BOB_TOSS=$TOSS_S
[ -f "$W/bob.incoming/bulk.bin" ] || die "bob.incoming/bulk.bin missing"
DST_SUM=$(sha256sum <"$W/bob.incoming/bulk.bin" | cut -d' ' -f1)
[ "$SRC_SUM" = "$DST_SUM" ] || die "sha256 mismatch"
TOTAL=$(awk -v a="$FILE_S" -v b="$A_XFER" -v c="$HUB_TOSS" -v d="$H_XFER" -v e="$BOB_TOSS" \
	'BEGIN { printf "%.3f", a + b + c + d + e }')

fig bulk_size "$SIZE_MB" MiB
fig file_time "$FILE_S" s
fig alice_to_hub_time "$A_XFER" s
fig hub_toss_time "$HUB_TOSS" s
fig hub_to_bob_time "$H_XFER" s
fig bob_toss_time "$BOB_TOSS" s
fig total_time "$TOTAL" s
fig total_rate "$(fdiv "$SIZE_MB" "$TOTAL")" MiB/s
fig sha256_match 1 bool
