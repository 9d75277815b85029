#!/usr/bin/env bash
# Runs a benchmark as on one of this VM's slow days, simulated: the command
# and everything it starts (relays, agents, Postfix, NNCP, limits.sh) go
# into cgroup-v1 groups that cap writes to the disk under /var/tmp, in
# bytes and in operations per second, and optionally the CPU time all of
# them may use together.
#
# On the slow day issue 20 records the disk wrote at about a quarter of its
# best (write + fsync 529 MiB/s, against 1,400-1,900 on good days) and the
# kernel's work took about twice its usual CPU. The defaults give a quarter
# of a good day's disk here: write + fsync ~335 MiB/s, fdatasync of 1 KiB
# ~1,230/s (good days ~5,000/s). CPUS=1 lets the whole benchmark use one
# core's time of the two — a cruder stand-in for slow system work, since
# it slows user-space work (cryptography) as much, which the real slow day
# did not. Said plainly, this is a simulation: the throttle spaces I/O out
# where a slow device is slow per operation, reads are not slowed, and a
# CPU quota stalls a process at the end of each 100 ms period instead of
# running it slower.
#
#   bench/slow-disk.sh bash bench/file-transfer.sh
#   WRITE_MBPS=360 WRITE_IOPS=3500 bench/slow-disk.sh bash bench/delivery.sh
#   CPUS=1 bench/slow-disk.sh bash bench/relay-submit.sh
#   LIMITS=1 bench/slow-disk.sh true        # limits.sh under the throttle
#
# Needs root and the blkio (and, for CPUS, cpu) controllers of cgroup v1;
# fails otherwise and never runs the command unthrottled. The groups are
# removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
WRITE_MBPS=${WRITE_MBPS:-360}
WRITE_IOPS=${WRITE_IOPS:-3500}
CPUS=${CPUS:-}
LIMITS=${LIMITS:-0}
CG=/sys/fs/cgroup
[[ -w $CG/blkio ]] || { echo "slow-disk: no writable cgroup-v1 blkio controller at $CG/blkio (root needed)" >&2; exit 2; }
[[ -z $CPUS || -w $CG/cpu ]] || { echo "slow-disk: CPUS given but no writable cgroup-v1 cpu controller at $CG/cpu" >&2; exit 2; }
# The block device under /var/tmp, where the benchmarks keep their homes
# (a partition is throttled through its whole disk).
dev=$(findmnt -n -o SOURCE --target /var/tmp)
[[ -b $dev ]] || { echo "slow-disk: /var/tmp is not on a block device ($dev)" >&2; exit 2; }
disk=/sys/class/block/$(basename "$dev")
[[ -e $disk/partition ]] && disk=$(dirname "$(readlink -f "$disk")")
majmin=$(cat "$disk/dev")
NAME=sealpost-slow-$$
GROUPS_MADE=()
cleanup() {
    # Whatever is left in a group goes back to the root group first.
    local g p
    for g in "${GROUPS_MADE[@]}"; do
        while read -r p; do echo "$p" >"$(dirname "$g")/cgroup.procs" 2>/dev/null || true; done <"$g/cgroup.procs"
        rmdir "$g" 2>/dev/null || true
    done
}
trap cleanup EXIT
mkdir "$CG/blkio/$NAME"
GROUPS_MADE+=("$CG/blkio/$NAME")
echo "$majmin $((WRITE_MBPS << 20))" >"$CG/blkio/$NAME/blkio.throttle.write_bps_device"
echo "$majmin $WRITE_IOPS" >"$CG/blkio/$NAME/blkio.throttle.write_iops_device"
ENTER=("$CG/blkio/$NAME")
what="writes to $dev ($majmin) capped at $WRITE_MBPS MiB/s and $WRITE_IOPS operations/s"
if [[ -n $CPUS ]]; then
    mkdir "$CG/cpu/$NAME"
    GROUPS_MADE+=("$CG/cpu/$NAME")
    period=100000
    quota=$(awk -v c="$CPUS" -v p="$period" 'BEGIN { printf "%d", c * p }')
    echo "$period" >"$CG/cpu/$NAME/cpu.cfs_period_us"
    echo "$quota" >"$CG/cpu/$NAME/cpu.cfs_quota_us"
    ENTER+=("$CG/cpu/$NAME")
    what="$what; CPU time capped at $CPUS cores"
fi
echo "# slow-disk: $what (a simulated slow day)" >&2
# Into the groups, then the command: its children inherit them.
SLOW_GROUPS="${ENTER[*]}" SLOW_NAME=$NAME LIMITS=$LIMITS sh -c 'for g in $SLOW_GROUPS; do echo $$ >"$g/cgroup.procs" || exit 3; done
grep -q ":blkio:/$SLOW_NAME\$" /proc/self/cgroup || exit 3
if [ "$LIMITS" = 1 ]; then bash ../shared/bench/anchors/limits.sh; fi
exec "$@"' sh "$@" \
    || { rc=$?; [[ $rc == 3 ]] && echo "slow-disk: could not enter the throttled groups" >&2; exit "$rc"; }
