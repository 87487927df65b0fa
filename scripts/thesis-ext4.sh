#!/usr/bin/env bash
# The go-volumes thesis on a real kernel: ext4 (a filesystem that is not copy-on-write) on an
# overcommitted LogPool volume, served over NBD and attached through nbdfuse and a loop
# device, sees ordinary write errors when the pool fills, and the snapshot taken before
# stays intact: e2fsck -fn passes on it and its files match their checksums. The snapshot
# is taken while ext4 is mounted (fsfreeze, then `logpool snapshot` through the server's
# control socket). Then freeing
# space (destroying another volume) lets e2fsck repair the full volume and its old files
# read back unchanged.
#
# Usage: scripts/thesis-ext4.sh PATH-TO-logpool
# Exit 0 passed, 77 skipped (not root, no /dev/fuse, a tool missing; the reason is printed),
# anything else failed.
set -euo pipefail
logpool=${1:?usage: thesis-ext4.sh PATH-TO-logpool}

skip() { echo "SKIPPED: $*"; exit 77; }
[ "$(id -u)" -eq 0 ] || skip "needs root (losetup, mount)"
[ -c /dev/fuse ] || skip "needs /dev/fuse"
[ -e /dev/loop-control ] || skip "needs loop devices (/dev/loop-control)"
for tool in nbdfuse losetup mkfs.ext4 e2fsck fsfreeze mount umount sha256sum; do
    command -v "$tool" >/dev/null || skip "needs $tool (Debian: libnbd-bin, mount, e2fsprogs, coreutils)"
done

work=$(mktemp -d /tmp/logpool-thesis.XXXXXX)
pool=$work/p.pool
loop="" server="" fuse_pid=""
log() { echo "thesis: $*"; }

detach() {
    if mountpoint -q "$work/mnt"; then umount "$work/mnt" || umount -l "$work/mnt"; fi
    if [ -n "$loop" ]; then losetup -d "$loop" || true; loop=""; fi
    if mountpoint -q "$work/fuse"; then umount "$work/fuse" || umount -l "$work/fuse"; fi
    if [ -n "$fuse_pid" ]; then wait "$fuse_pid" 2>/dev/null || true; fuse_pid=""; fi
}
stop_server() {
    if [ -n "$server" ]; then
        kill -TERM "$server"
        wait "$server" || { echo "logpool serve exited with $?"; cat "$work/serve.log"; return 1; }
        server=""
    fi
}
cleanup() {
    set +e
    detach
    [ -n "$server" ] && kill -TERM "$server" && wait "$server"
    rm -rf "$work"
}
trap cleanup EXIT

# serve EXPORT [ro]: serve the pool, attach EXPORT through nbdfuse and a loop device.
attach() {
    local export=$1 mode=${2:-rw}
    mkdir -p "$work/fuse" "$work/mnt"
    "$logpool" serve "$pool" --socket "$work/s.sock" 2>>"$work/serve.log" &
    server=$!
    for _ in $(seq 100); do [ -S "$work/s.sock" ] && break; sleep 0.05; done
    local ro=()
    [ "$mode" = ro ] && ro=(--readonly)
    nbdfuse "${ro[@]}" "$work/fuse" "nbd+unix:///$export?socket=$work/s.sock" &
    fuse_pid=$!
    for _ in $(seq 100); do [ -e "$work/fuse/nbd" ] && break; sleep 0.05; done
    [ -e "$work/fuse/nbd" ] || { echo "nbdfuse did not attach $export"; return 1; }
    if [ "$mode" = ro ]; then loop=$(losetup -r -f --show "$work/fuse/nbd"); else loop=$(losetup -f --show "$work/fuse/nbd"); fi
}

# An overcommitted pool: 96 MiB, uncompressed (so random data fills it), a 128 MiB volume
# for ext4 and a 16 MiB filler volume whose space is freed at the end.
"$logpool" init "$pool" --size 96M --compression none >/dev/null
"$logpool" create "$pool" disk --size 128M
"$logpool" create "$pool" filler --size 16M
head -c 12M /dev/urandom | "$logpool" write "$pool" filler >/dev/null

log "mkfs.ext4 on the served volume, then files and their checksums"
attach disk
mkfs.ext4 -q -F "$loop"
mount "$loop" "$work/mnt"
mkdir "$work/mnt/keep"
for i in 1 2 3 4; do head -c 3M /dev/urandom >"$work/mnt/keep/f$i"; done
sync -f "$work/mnt/keep/f1"
(cd "$work/mnt/keep" && sha256sum f1 f2 f3 f4) >"$work/sums"

log "snapshot while mounted: fsfreeze, logpool snapshot through the server's control socket, thaw"
fsfreeze -f "$work/mnt"
"$logpool" snapshot "$pool" disk before || { fsfreeze -u "$work/mnt"; exit 1; }
fsfreeze -u "$work/mnt"
"$logpool" list "$pool"

log "keep writing until the pool refuses writes"
set +e
dd if=/dev/urandom of="$work/mnt/big" bs=1M count=400 status=none 2>"$work/dd.err"
dd_status=$?
sync
set -e
cat "$work/dd.err"
[ "$dd_status" -ne 0 ] || { echo "dd into a full pool succeeded: the pool did not fill"; exit 1; }
detach
stop_server
grep -q "pool full" "$work/serve.log" || { echo "the server logged no pool-full refusal"; tail "$work/serve.log"; exit 1; }
log "the pool refused writes (server log: $(grep -c 'pool full' "$work/serve.log") pool-full refusals)"
"$logpool" verify "$pool"

log "the snapshot, served read-only, passes e2fsck -fn and its files match"
attach before ro
e2fsck -fn "$loop"
mount -o ro,noload "$loop" "$work/mnt"
(cd "$work/mnt/keep" && sha256sum -c --quiet "$work/sums")
detach
stop_server

log "free space (destroy filler), then e2fsck repairs the full volume and the old files read back"
"$logpool" destroy "$pool" filler
attach disk
set +e
e2fsck -fy "$loop"
fsck_status=$?
set -e
[ "$fsck_status" -le 1 ] || { echo "e2fsck -fy exited $fsck_status"; exit 1; }
e2fsck -fn "$loop"
mount "$loop" "$work/mnt"
(cd "$work/mnt/keep" && sha256sum -c --quiet "$work/sums")
detach
stop_server
"$logpool" verify "$pool"
log "passed"
