#!/usr/bin/env bash
# sealpost's offline seal/open against GnuPG's sign+encrypt / decrypt+verify,
# the way people run them: one process per message, and one large file.
# Runs ../shared/bench/anchors/gpg.sh (GnuPG and the age CLI) in the same
# session, then the same work with the release `sealpost`, and prints ratios.
#
#   bench/seal-vs-gpg.sh            # COUNT=300 messages of 1 KiB, SIZE_MB=256
#   COUNT=1000 SIZE_MB=512 bench/seal-vs-gpg.sh
#
# Output lines: "<system> <figure> <value> <unit>", then "ratio ..." lines.
# Local only (no network); everything lives in one mktemp dir, removed at exit.
set -euo pipefail
cd "$(dirname "$0")/.."
COUNT=${COUNT:-300}
SIZE_MB=${SIZE_MB:-256}
ANCHOR=${ANCHOR:-../shared/bench/anchors/gpg.sh}
[[ $COUNT =~ ^[0-9]+$ && $COUNT -ge 1 && $COUNT -le 100000 ]] || { echo "COUNT must be 1..100000" >&2; exit 2; }
[[ $SIZE_MB =~ ^[0-9]+$ && $SIZE_MB -ge 1 && $SIZE_MB -le 16384 ]] || { echo "SIZE_MB must be 1..16384" >&2; exit 2; }

cargo build --release --locked -q -p sealpost
SP=$PWD/target/release/sealpost
T=$(mktemp -d /var/tmp/sealpost-vs-gpg.XXXXXX)
trap 'rm -rf "$T"' EXIT

echo "# running $ANCHOR (COUNT=$COUNT SIZE_MB=$SIZE_MB)" >&2
COUNT=$COUNT SIZE_MB=$SIZE_MB bash "$ANCHOR" | tee "$T/gpg.out"

"$SP" --home "$T/alice" init --name Alice >/dev/null
"$SP" --home "$T/bob" init --name Bob >/dev/null
"$SP" --home "$T/alice" contact add "$("$SP" --home "$T/bob" --json id | sed 's/.*"card":"\([^"]*\)".*/\1/')" --name bob >/dev/null
"$SP" --home "$T/bob" contact add "$("$SP" --home "$T/alice" --json id | sed 's/.*"card":"\([^"]*\)".*/\1/')" --name alice >/dev/null

mkdir "$T/msg" "$T/sealed" "$T/opened"
head -c $((COUNT * 1024 * 3 / 4 + 4096)) /dev/urandom | base64 -w 76 | head -c $((COUNT * 1024)) |
    split -a 6 -d -b 1024 - "$T/msg/m"
mapfile -t MSGS < <(cd "$T/msg" && ls)

now() { date +%s.%N; }
calc() { LC_ALL=C awk "BEGIN { printf \"$1\", $2 }"; }

t0=$(now)
for m in "${MSGS[@]}"; do "$SP" --home "$T/alice" seal --to bob -o "$T/sealed/$m" "$T/msg/$m" >/dev/null 2>&1; done
t1=$(now)
for m in "${MSGS[@]}"; do "$SP" --home "$T/bob" open -o "$T/opened/$m" "$T/sealed/$m" >/dev/null 2>&1; done
t2=$(now)
cmp <(cat "$T/msg"/*) <(cat "$T/opened"/*) || { echo "sealpost: opened messages differ" >&2; exit 1; }
seal_rate=$(calc %.1f "$COUNT / ($t1 - $t0)")
open_rate=$(calc %.1f "$COUNT / ($t2 - $t1)")
echo "sealpost msg_seal_rate $seal_rate msg/s"
echo "sealpost msg_open_rate $open_rate msg/s"

head -c $((SIZE_MB * 1000000)) /dev/urandom > "$T/file"
sync
t0=$(now)
"$SP" --home "$T/alice" seal --to bob -o "$T/file.sp" "$T/file" >/dev/null 2>&1
t1=$(now)
"$SP" --home "$T/bob" open -o "$T/file.out" "$T/file.sp" >/dev/null 2>&1
t2=$(now)
cmp "$T/file" "$T/file.out" || { echo "sealpost: opened file differs" >&2; exit 1; }
fseal=$(calc %.1f "$SIZE_MB / ($t1 - $t0)")
fopen=$(calc %.1f "$SIZE_MB / ($t2 - $t1)")
echo "sealpost file_seal_rate $fseal MB/s"
echo "sealpost file_open_rate $fopen MB/s"

g() { awk -v k="$1" '$1 == "gpg" && $2 == k { print $3 }' "$T/gpg.out"; }
a() { awk -v k="$1" '$1 == "age" && $2 == k { print $3 }' "$T/gpg.out"; }
echo "ratio msg_seal/gpg_sign_encrypt $(calc %.1f "$seal_rate / $(g msg_sign_encrypt_rate)") x"
echo "ratio msg_open/gpg_decrypt_verify $(calc %.1f "$open_rate / $(g msg_decrypt_verify_rate)") x"
echo "ratio file_seal/gpg_sign_encrypt_nocompress $(calc %.2f "$fseal / $(g file_sign_encrypt_nocompress_rate)") x"
echo "ratio file_open/gpg_decrypt_verify $(calc %.2f "$fopen / $(g file_decrypt_verify_rate)") x"
echo "ratio file_seal/age_cli_encrypt $(calc %.2f "$fseal / $(a file_encrypt_rate)") x"
echo "ratio file_open/age_cli_decrypt $(calc %.2f "$fopen / $(a file_decrypt_rate)") x"
